"""How much of a tool's result may travel on: into the model's next prompt, the user's answer and the capture
store (which keeps prompts and answers). `clip` is the one way to cut, and it always says what it cut.

SQLite's own limits on a query (the size of one value, the work of one statement) live in `agents/tools/sql.py`.
"""

from __future__ import annotations

CELL_CHARS = 2_000  # one value saved from a query: longer text (or blob hex) is cut
RESULT_BYTES = 1_000_000  # one query's saved rows: the fetch stops once the kept cells pass this
TOOL_RESULT_CHARS = 1_500  # a tool's answer to the model; a 135M model has a small context
TABLE_CELL_CHARS = 200  # one cell of a markdown table
PROMPT_RESULT_CHARS = 300  # an earlier step's output, in a sub-agent's prompt
PROMPT_DATASET_CHARS = 600  # one dataset's description, in a sub-agent's prompt
PROMPT_CHARS = 8_000  # a sub-agent's whole task prompt
SUMMARY_RESULT_CHARS = 600  # one result, in the aggregate model's prompt
ANSWER_PART_CHARS = 50_000  # one formatted output or table in the answer
ANSWER_ERROR_CHARS = 500  # one failure's error text in the answer or a retry prompt


def clip(text: str, limit: int, what: str = "text") -> str:
    """`text` if it fits in `limit` characters, else its first `limit` characters and a note saying so.

    Example: `clip("x" * 5000, 2000, "cell")` ends with `[cut: cell was 5,000 characters; showing the first 2,000]`.
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]} {cut_note(what, len(text), limit)}"


def cut_note(what: str, size: int, shown: int, unit: str = "characters") -> str:
    return f"[cut: {what} was {size:,} {unit}; showing the first {shown:,}]"

"""The sub-agents' tools: each agent gets a list of ToolSpecs, and run_tool executes a model's call to one."""

from agents.tools.base import ToolContext, ToolResult, ToolSpec, run_tool
from agents.tools.formatting import markdown_table, report, to_csv, to_json
from agents.tools.processing import aggregate, derive_column, filter_rows, sort_rows, top_k
from agents.tools.sales_db import ensure_sales_db
from agents.tools.sql import describe_table, list_tables, run_sql
from agents.tools.validation import check_not_empty, check_range, validate_json_schema

RETRIEVAL_TOOLS = [list_tables, describe_table, run_sql]
PROCESSING_TOOLS = [filter_rows, aggregate, sort_rows, top_k, derive_column]
VALIDATION_TOOLS = [validate_json_schema, check_range, check_not_empty]
FORMATTING_TOOLS = [markdown_table, to_csv, to_json, report]
TOOLS_BY_AGENT = {
    "retrieval": RETRIEVAL_TOOLS,
    "processing": PROCESSING_TOOLS,
    "validation": VALIDATION_TOOLS,
    "formatting": FORMATTING_TOOLS,
}

__all__ = [
    "FORMATTING_TOOLS", "PROCESSING_TOOLS", "RETRIEVAL_TOOLS", "TOOLS_BY_AGENT", "VALIDATION_TOOLS",
    "ToolContext", "ToolResult", "ToolSpec", "ensure_sales_db", "run_tool",
]

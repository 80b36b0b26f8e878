"""Probe: one prompt variant on a few BFCL simple_python items (from item 100), free decoding, to try a rule
wording or an example format before changing `prompts/evolve.py`.

    .venv/bin/python bench/context_probe.py gguf:smollm2-135m turns 6

Variants (all but `base` put the Hermes tool list into the system prompt):
  base         "You are a helpful assistant." (the backend appends the tool list)
  r1           tools, then a rule saying how to write the call with the function named in <tools>
  turns        r1 plus two worked examples as earlier conversation turns, in the Hermes format
  turns2       the rule R2 ("copy its name exactly") before the tool list, examples as turns
  turns3       the tool list, then R2, examples as turns
  named        tools, then a rule naming this request's own function: Call `f`: <tool_call>{"name": "f", ...}
  named_turns  named plus the examples as turns
  sysex        tools, r1, then the examples in the system prompt, each with its own tool signature
  exfirst      those examples first, then the tools, then r1 (exfirst_nt: examples without their tools)
"""

import asyncio
import dataclasses
import json
import sys
import time

from app import hermes
from app.config import load_settings
from bench.context_engineering import SUITE, answer
from training.evaluate import EvalRouter, eval_settings
from training.suites import load_suite

BASE = "You are a helpful assistant."
R1 = ('Answer with exactly one call of the function named in <tools>, written as '
      '<tool_call>{"name": "<its name from <tools>>", "arguments": {...}}</tool_call>. '
      'No ```json fence, no code, no explanation.')
R2 = ('Call the function listed in <tools>: copy its "name" exactly, character for character; never make up a '
      'function name. Write <tool_call>{"name": "<the name from <tools>>", "arguments": {...}}</tool_call> and nothing else.')
SHOTS = [("Calculate the factorial of 5 using math functions.",
          {"name": "math.factorial", "description": "Calculate the factorial of a number.",
           "parameters": {"type": "object", "properties": {"number": {"type": "integer"}}, "required": ["number"]}},
          {"number": 5}),
         ("Solve a quadratic equation where a=2, b=6, and c=5",
          {"name": "solve_quadratic_equation", "description": "Solve a quadratic equation.",
           "parameters": {"type": "object", "properties": {k: {"type": "integer"} for k in "abc"},
                          "required": ["a", "b", "c"]}},
          {"a": 2, "b": 6, "c": 5})]
TURNS = [m for user, f, args in SHOTS for m in ({"role": "user", "content": user},
                                                {"role": "assistant", "content": hermes.format_call(f["name"], args)})]


def system_examples(with_tools: bool) -> str:
    blocks = [(f"Tools: {json.dumps({'type': 'function', 'function': f})}\n" if with_tools else "")
              + f"User: {user}\nAnswer: {hermes.format_call(f['name'], args)}" for user, f, args in SHOTS]
    return ("Worked examples (each uses the function of its own tools; call the function of YOUR <tools>):\n"
            + "\n\n".join(blocks))


def prepare(variant: str):
    def build(item):
        tools, msgs = hermes.tools_prompt([t["function"] for t in item.tools]), item.messages
        name = item.tools[0]["function"]["name"]
        named = (f'Call `{name}`: write <tool_call>{{"name": "{name}", "arguments": {{...}}}}</tool_call> and '
                 "nothing else. No code, no explanation.")
        text = {"base": BASE, "r1": f"{BASE}\n\n{tools}\n\n{R1}", "turns": f"{BASE}\n\n{tools}\n\n{R1}",
                "turns2": f"{BASE}\n\n{R2}\n\n{tools}", "turns3": f"{BASE}\n\n{tools}\n\n{R2}",
                "named": f"{BASE}\n\n{tools}\n\n{named}", "named_turns": f"{BASE}\n\n{tools}\n\n{named}",
                "sysex": f"{BASE}\n\n{tools}\n\n{R1}\n\n{system_examples(True)}",
                "exfirst": f"{BASE}\n\n{system_examples(True)}\n\n{tools}\n\n{R1}",
                "exfirst_nt": f"{BASE}\n\n{system_examples(False)}\n\n{tools}\n\n{R1}"}[variant]
        if "turns" in variant:
            msgs = TURNS + msgs
        return {"id": f"probe/{variant}", "text": text}, dataclasses.replace(item, messages=msgs)
    return build


async def main(binding: str, variant: str, n: int) -> None:
    router = EvalRouter(eval_settings(load_settings(None), binding), "free")
    items = load_suite(SUITE, offset=100, limit=n).items
    started = time.perf_counter()
    answers = await answer(router, items, "free", 96, prepare(variant))
    for a in answers:
        print(a.row["valid"], a.row["exact"], a.row["error_type"], repr(a.row["output"][:120]))
    valid, exact = sum(a.row["valid"] for a in answers), sum(a.row["exact"] for a in answers)
    print(f"{binding} {variant}: valid {valid}/{n} exact {exact}/{n} ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))

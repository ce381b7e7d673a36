"""A tool plug-in, as an operator would write one: importing it registers the tool `plugin_echo`.

tests/test_tools.py names it in the policy's `workers.tool_plugins`.
"""

from __future__ import annotations

from typing import Any

from contracts.state import tool_key
from services.workers.conversation import ToolSpec
from services.workers.errors import ToolError
from services.workers.tools import register

NAME = "plugin_echo"


class Echo:
    spec = ToolSpec(name=NAME, description="Answer with the text given.",
                    parameters={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})
    dependency = tool_key(NAME)

    async def run(self, arguments: dict[str, Any]) -> str:
        text = arguments.get("text") if isinstance(arguments, dict) else None
        if not isinstance(text, str):
            raise ToolError('plugin_echo takes {"text": "..."}')
        return text


register(NAME, lambda settings: Echo())

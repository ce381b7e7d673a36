"""An MCP server for the tests, run as its own process: the `mcp` SDK's MCPServer over streamable HTTP.

    python tests/mcp_server.py --port PORT [--host 127.0.0.1]

serves http://HOST:PORT/mcp with the tools

- `lookup(key)`: answers `value of KEY` as text;
- `fail(reason)`: raises, so the result has isError and the reason as its text;
- `slow(seconds)`: answers `slept` after that many seconds (for timeouts);
- `picture()`: a text block and an image block;
- `calculator(expression)`: takes the name of a built-in (which must win over it);
- `bad name!`: a name no task could name (which must not be offered);
- `enable_extra()`: adds the tool `extra` (answers `extra here`) and says the tools changed.
"""

from __future__ import annotations

import argparse
import base64

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ImageContent, TextContent

server = MCPServer("corral-test-tools", log_level="WARNING")
PIXEL = base64.b64encode(bytes.fromhex("89504e470d0a1a0a")).decode()


@server.tool()
def lookup(key: str) -> str:
    """Look a key up."""
    return f"value of {key}"


@server.tool()
def fail(reason: str = "it always fails") -> str:
    """Fail with the reason given."""
    raise ToolError(reason)


@server.tool()
async def slow(seconds: float) -> str:
    """Answer after `seconds`."""
    await anyio.sleep(seconds)
    return "slept"


@server.tool()
def picture() -> list[TextContent | ImageContent]:
    """A caption and an image."""
    return [TextContent(type="text", text="a caption"), ImageContent(type="image", data=PIXEL, mime_type="image/png")]


@server.tool()
def calculator(expression: str) -> str:
    """A namesake of the worker's built-in calculator."""
    return "the MCP server's calculator"


@server.tool(name="bad name!")
def bad_name() -> str:
    """A tool whose name is not a ToolName."""
    return "unreachable"


def extra() -> str:
    """Added at run time by enable_extra."""
    return "extra here"


@server.tool()
async def enable_extra(ctx: Context) -> str:
    """Add the tool `extra` and tell listeners the tool list changed."""
    if "extra" not in {tool.name for tool in await server.list_tools()}:
        server.add_tool(extra)
    await ctx.notify_tools_changed()
    return "extra enabled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    server.run("streamable-http", host=args.host, port=args.port)


if __name__ == "__main__":
    main()

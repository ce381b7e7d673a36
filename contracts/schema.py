"""JSON Schemas of the contracts, for publishers in other languages.

`corral contracts` writes them to contracts/schemas/; a test checks that the
committed files equal what the code generates, so they cannot drift.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgspec

from contracts.approvals import APPROVAL_CONTRACTS
from contracts.commands import COMMAND_CONTRACTS
from contracts.events import ALL_CONTRACTS, CONTRACT_VERSION
from contracts.queries import QUERY_CONTRACTS

SCHEMA_DIR = Path(__file__).parent / "schemas"


def _file_name(contract: type) -> str:
    tag = contract.__struct_config__.tag
    return f"{tag if isinstance(tag, str) else contract.__name__}.v{CONTRACT_VERSION}.json"


def schemas() -> dict[str, str]:
    """File name -> JSON Schema text, for every contract."""
    out = {}
    for contract in (*ALL_CONTRACTS, *COMMAND_CONTRACTS, *QUERY_CONTRACTS, *APPROVAL_CONTRACTS):
        schema = _normalised(msgspec.json.schema(contract))
        schema["$comment"] = f"Corral contract {contract.__name__}, version {CONTRACT_VERSION}. Generated: corral contracts"
        out[_file_name(contract)] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def _normalised(node: Any) -> Any:
    """Descriptions dedented and stripped the same way whatever msgspec version made them
    (0.23 dedents docstrings, earlier versions kept their indentation)."""
    if isinstance(node, dict):
        return {key: inspect.cleandoc(value) if key == "description" and isinstance(value, str)
                else _normalised(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_normalised(item) for item in node]
    return node


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schemas().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written

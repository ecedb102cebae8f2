"""``python -m stream.events``: print the event JSON Schema (generated from the msgspec Structs),
or write the committed file."""
from __future__ import annotations

import argparse
import sys

from stream.events.model import schema_text
from stream.events.schema import SCHEMA_PATH


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stream.events",
        description="Print the event JSON Schema, generated from the msgspec Structs of "
                    "stream/events/model.py, or write it to the committed file.",
    )
    parser.add_argument("--write-schema", action="store_true", help=f"write it to {SCHEMA_PATH}")
    args = parser.parse_args(argv)
    if args.write_schema:
        SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
        print(f"wrote {SCHEMA_PATH}")
    else:
        sys.stdout.write(schema_text())


if __name__ == "__main__":
    main()

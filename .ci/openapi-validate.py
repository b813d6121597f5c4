#!/usr/bin/env python3
"""Validate OpenAPI 3.1 documents: `openapi-validate.py FILE...`.

Each FILE must be JSON whose `openapi` field is 3.1.x, and must pass openapi-spec-validator's
OpenAPI 3.1 checks (the 3.1 meta-schema, schemas against their JSON Schema dialect,
defaults matching their schemas, path parameters declared, ...), and every `$ref` must
resolve inside the document (a check of ours: the validator does not follow them). Every problem is printed, one per line, with the
place in the document where it was found. Exit status: 0 when every file is valid, 1 when
one is not, 2 on bad usage or a validator that is not installed.

`.ci/test` installs the validator (pinned in `.ci/openapi-requirements.txt`) into a
virtualenv under `target/` and points `GEOPUSH_CI_PYTHON` at its python;
`tests/tests/openapi.rs` runs this script with it.
"""

import json
import sys

try:
    from jsonschema_path import SchemaPath
    from openapi_spec_validator import OpenAPIV31SpecValidator
except ImportError as e:  # pragma: no cover - depends on the environment
    print(
        f"openapi-spec-validator is not installed for {sys.executable}: {e}\n"
        "run .ci/test, or: python3 -m venv target/ci-venv && "
        "target/ci-venv/bin/pip install -r .ci/openapi-requirements.txt",
        file=sys.stderr,
    )
    sys.exit(2)


def where(error) -> str:
    """The JSON path of an error: `paths./v1/places.get.parameters.0`."""
    path = getattr(error, "absolute_path", None) or getattr(error, "path", None) or []
    return ".".join(str(p) for p in path) or "(document root)"


def resolve(document, ref: str) -> bool:
    """Whether the local JSON pointer `ref` (`#/components/schemas/X`) names a value."""
    node = document
    for part in ref[2:].split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def dangling_refs(document) -> list[str]:
    """Every `$ref` that does not resolve inside the document. openapi-spec-validator 0.9
    does not follow `$ref`s inside 3.1 schemas, so a reference to a missing component would
    pass it; the document must be self-contained, so only local references are allowed."""
    found = []

    def walk(node, at: list[str]) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                if not ref.startswith("#"):
                    found.append(f"at {'.'.join(at)}: $ref {ref!r} is not local")
                elif not resolve(document, ref):
                    found.append(f"at {'.'.join(at)}: $ref {ref!r} does not resolve")
            for key, value in node.items():
                walk(value, at + [str(key)])
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, at + [str(index)])

    walk(document, [])
    return found


def problems(path: str) -> list[str]:
    """Everything wrong with the document in `path`; empty when it is valid OpenAPI 3.1."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError) as e:
        return [f"cannot read it as JSON: {e}"]
    if not isinstance(document, dict):
        return ["the document is not a JSON object"]
    version = document.get("openapi")
    if not (isinstance(version, str) and version.startswith("3.1.")):
        return [f"`openapi` is {version!r}, not 3.1.x"]
    validator = OpenAPIV31SpecValidator(SchemaPath.from_dict(document))
    found = dangling_refs(document)
    try:
        for error in validator.iter_errors():
            found.append(f"at {where(error)}: {error.message}")
    except Exception as e:  # a document so broken the walk itself fails
        found.append(f"validation stopped: {type(e).__name__}: {e}")
    return found


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    status = 0
    for path in argv[1:]:
        found = problems(path)
        if found:
            status = 1
            print(f"{path}: NOT valid OpenAPI 3.1 ({len(found)} problems)")
            for problem in found:
                print(f"  {problem}")
        else:
            print(f"{path}: valid OpenAPI 3.1")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""What the test clients share: JSON-lines output and the versions they ran with."""

import importlib.metadata
import json
import platform


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def emit_versions(client, *packages):
    """The `versions` event: each package's installed version, and Python's."""
    emit(
        "versions",
        client=client,
        **{p.replace("-", "_"): importlib.metadata.version(p) for p in packages},
        python=platform.python_version(),
    )

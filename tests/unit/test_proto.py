"""The committed generated gRPC code is what the committed .proto generates."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_proto(tmp_path):
    import grpc_tools  # noqa: F401 - a test dependency (pip install -e '.[test]'); fail loudly without it
    (tmp_path / "daemons").mkdir()
    (tmp_path / "daemons" / "dualpath.proto").write_bytes((ROOT / "daemons" / "dualpath.proto").read_bytes())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                    "daemons/dualpath.proto"], cwd=tmp_path, check=True)
    for name in ("dualpath_pb2.py", "dualpath_pb2_grpc.py"):
        fresh = (tmp_path / "daemons" / name).read_text()
        committed = (ROOT / "daemons" / name).read_text()
        assert fresh == committed, f"daemons/{name} is stale: regenerate it (see daemons/dualpath.proto)"

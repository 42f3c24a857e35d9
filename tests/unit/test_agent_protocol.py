"""emulator.agent.serve: one JSON request a line in, one JSON reply a line out, in memory."""

from __future__ import annotations

import io
import json

from emulator import agent


class FakeOps:
    def __init__(self):
        self.calls: list[tuple] = []

    def add(self, a: int, b: int) -> int:
        self.calls.append(("add", a, b))
        return a + b

    def nothing(self) -> None:
        self.calls.append(("nothing",))

    def table(self, rows: list[list]) -> dict:
        return {"n": len(rows), "first": rows[0]}

    def boom(self, why: str) -> None:
        raise ValueError(f"no: {why}")

    def lookup(self, key: str) -> str:
        return {"a": "x"}[key]

    def _private(self) -> str:
        self.calls.append(("_private",))
        return "secret"


def _serve(*requests, ops=None) -> tuple[list[dict], FakeOps]:
    ops = ops or FakeOps()
    lines = [r if isinstance(r, str) else json.dumps(r) + "\n" for r in requests]
    out = io.StringIO()
    agent.serve(ops, io.StringIO("".join(lines)), out)
    text = out.getvalue()
    assert text.endswith("\n") or text == ""
    return [json.loads(line) for line in text.splitlines()], ops


def test_ok_result_and_id_echoed():
    replies, ops = _serve({"id": 7, "op": "add", "args": {"a": 2, "b": 40}})
    assert replies == [{"id": 7, "ok": True, "result": 42}]
    assert ops.calls == [("add", 2, 40)]


def test_structured_args_and_results_cross_as_json():
    replies, _ = _serve({"id": 1, "op": "table", "args": {"rows": [["dp-x", "eth0", 3], ["b"]]}})
    assert replies == [{"id": 1, "ok": True, "result": {"n": 2, "first": ["dp-x", "eth0", 3]}}]


def test_no_args_and_none_result():
    replies, ops = _serve({"id": 3, "op": "nothing"})  # "args" left out
    assert replies == [{"id": 3, "ok": True, "result": None}]
    assert ops.calls == [("nothing",)]


def test_exception_is_a_failed_reply_with_its_type():
    replies, _ = _serve({"id": 4, "op": "boom", "args": {"why": "disk"}},
                        {"id": 5, "op": "lookup", "args": {"key": "zz"}})
    assert replies[0] == {"id": 4, "ok": False, "error": "ValueError: no: disk"}
    assert replies[1]["id"] == 5 and replies[1]["ok"] is False
    assert replies[1]["error"].startswith("KeyError: ")
    assert "zz" in replies[1]["error"]
    assert "result" not in replies[0]


def test_bad_arguments_and_unknown_ops_fail_without_ending_the_loop():
    replies, ops = _serve({"id": 1, "op": "add", "args": {"a": 1}},
                          {"id": 2, "op": "nope", "args": {}},
                          {"id": 3, "op": "add", "args": {"a": 1, "b": 2}})
    assert [r["id"] for r in replies] == [1, 2, 3]
    assert replies[0]["ok"] is False and replies[0]["error"].startswith("TypeError: ")
    assert replies[1]["ok"] is False and replies[1]["error"] == "ValueError: no op 'nope'"
    assert replies[2] == {"id": 3, "ok": True, "result": 3}
    assert ops.calls == [("add", 1, 2)]


def test_blank_lines_are_ignored():
    replies, _ = _serve("\n", "   \n", {"id": 1, "op": "add", "args": {"a": 1, "b": 1}}, "\t\n",
                        {"id": 2, "op": "add", "args": {"a": 2, "b": 2}}, "\n")
    assert replies == [{"id": 1, "ok": True, "result": 2}, {"id": 2, "ok": True, "result": 4}]


def test_replies_keep_request_order_and_ids_are_echoed_not_counted():
    ids = (10, 3, "x", 99)
    replies, _ = _serve(*({"id": i, "op": "add", "args": {"a": n, "b": 1}} for n, i in enumerate(ids)))
    assert [(r["id"], r["result"]) for r in replies] == [(10, 1), (3, 2), ("x", 3), (99, 4)]


def test_private_ops_are_refused_and_not_run():
    replies, ops = _serve({"id": 1, "op": "_private", "args": {}}, {"id": 2, "op": "__class__", "args": {}})
    assert [(r["id"], r["ok"]) for r in replies] == [(1, False), (2, False)]
    assert "no op '_private'" in replies[0]["error"] and "no op '__class__'" in replies[1]["error"]
    assert ops.calls == []


def test_a_line_that_is_not_json_is_answered_and_the_loop_goes_on():
    replies, ops = _serve("{not json\n", {"id": 2, "op": "add", "args": {"a": 1, "b": 1}})
    assert replies[0]["id"] is None and replies[0]["ok"] is False and "JSONDecodeError" in replies[0]["error"]
    assert replies[1] == {"id": 2, "ok": True, "result": 2}


def test_empty_input_writes_nothing():
    replies, _ = _serve()
    assert replies == []


def test_each_reply_is_flushed_as_it_is_written():
    class Out(io.StringIO):
        def __init__(self):
            super().__init__()
            self.flushed: list[str] = []

        def flush(self):
            self.flushed.append(self.getvalue())

    out = Out()
    reqs = "".join(json.dumps({"id": i, "op": "nothing"}) + "\n" for i in (1, 2))
    agent.serve(FakeOps(), io.StringIO(reqs), out)
    assert len(out.flushed) == 2
    assert out.flushed[0].count("\n") == 1 and out.flushed[1].count("\n") == 2


def test_real_ops_clock_and_cpu_through_serve(tmp_path, monkeypatch):
    """The agent's own Ops, through serve, for the ops that need no root (making an Ops touches no file)."""
    from emulator import dequeue

    monkeypatch.setattr(dequeue, "INSTANCE", dequeue.INSTANCE)  # Ops names its tracefs instance: restored after
    ops = agent.Ops("s9", "r1", str(tmp_path))
    assert dequeue.INSTANCE == "dp-dequeue-s9"
    replies, _ = _serve({"id": 1, "op": "clock"}, {"id": 2, "op": "cpu"}, ops=ops)
    assert replies[0]["ok"] and set(replies[0]["result"]) == {"mono", "wall"}
    t, busy, total = replies[1]["result"]
    assert replies[1]["ok"] and 0 <= busy <= total

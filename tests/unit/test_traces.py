"""traffic.traces: the Mooncake JSONL loader, its validation and prefix hits."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from traffic.traces import TraceRequest, hit_ratio, load_mooncake, prefix_hits

# the real trace ships with the repository (traffic/data/mooncake, Apache-2.0)
REAL_TRACE = Path(__file__).resolve().parents[2] / "traffic" / "data" / "mooncake" / "conversation_trace.jsonl"


def write_jsonl(tmp_path, rows, name="trace.jsonl") -> Path:
    """rows: dicts (dumped as JSON) or raw strings (written as they are)."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def req(ts_ms, inp, out, ids) -> dict:
    return {"timestamp": ts_ms, "input_length": inp, "output_length": out, "hash_ids": ids}


def test_loads_requests(tmp_path):
    path = write_jsonl(tmp_path, [req(0, 1000, 10, [1, 2]), "", req(1500, 700, 20, [1, 3])])
    got = load_mooncake(path)
    assert got == [TraceRequest(0.0, 1000, 10, (1, 2)), TraceRequest(1.5, 700, 20, (1, 3))]
    assert load_mooncake(str(path), limit=1) == got[:1]
    assert load_mooncake(path, limit=0) == []


def test_prefix_hits_longest_seen_prefix(tmp_path):
    rows = [
        req(0, 1500, 1, [1, 2, 3]),      # cold: 0
        req(10, 2000, 1, [1, 2, 9, 3]),  # 1, 2 seen; 9 new: 2 blocks
        req(20, 1100, 1, [1, 2, 3]),     # all seen: 3 blocks = 1536, capped at 1100
        req(30, 900, 1, [5, 1, 2]),      # first block new: 0 even though 1, 2 seen
        req(40, 2100, 1, [1, 2, 9, 3, 5]),  # all seen (9 from request 2, 5 from 4)
    ]
    requests = load_mooncake(write_jsonl(tmp_path, rows))
    assert prefix_hits(requests) == [0, 1024, 1100, 0, 2100]
    assert prefix_hits(requests, block_tokens=100) == [0, 200, 300, 0, 500]
    assert hit_ratio(requests) == pytest.approx((1024 + 1100 + 2100) / (1500 + 2000 + 1100 + 900 + 2100))
    assert prefix_hits([]) == [] and hit_ratio([]) == 0.0
    with pytest.raises(ValueError, match="block_tokens"):
        prefix_hits(requests, block_tokens=0)


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"timestamp": 5, "input_length": 10', "not valid JSON"),
        ("[1, 2, 3]", "expected a JSON object"),
        ('{"timestamp": 5, "input_length": 10, "output_length": 1}', "missing key.*hash_ids"),
        (json.dumps(req(5, -10, 1, [1])), "input_length is -10, negative"),
        (json.dumps(req(5, 10, -1, [1])), "output_length is -1, negative"),
        (json.dumps(req(5, 10.5, 1, [1])), "input_length is 10.5, not an integer"),
        (json.dumps(req(5, 10, 1, [1, "x"])), r"hash_ids\[1\] is 'x', not an integer"),
        (json.dumps(req(5, 10, 1, [1, 2.0])), r"hash_ids\[1\] is 2.0, not an integer"),
        (json.dumps(req(5, 10, 1, "1,2")), "hash_ids is str, not a list"),
        (json.dumps(req(-1, 10, 1, [1])), "timestamp is -1"),
        (json.dumps(req("5", 10, 1, [1])), "timestamp is '5'"),
        (json.dumps(req(1, 10, 1, [1])), "timestamp 1 ms goes backwards"),
    ],
)
def test_malformed_line_names_file_line_and_problem(tmp_path, bad_line, problem):
    path = write_jsonl(tmp_path, [req(0, 10, 1, [0]), req(2, 10, 1, [0]), bad_line, req(9, 10, 1, [0])])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: {problem}"):
        load_mooncake(path)


def test_bad_limit_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path, [req(0, 10, 1, [0])])
    with pytest.raises(ValueError, match="limit"):
        load_mooncake(path, limit=-1)
    with pytest.raises(OSError):
        load_mooncake(tmp_path / "absent.jsonl")


def test_real_mooncake_trace(capsys):
    requests = load_mooncake(REAL_TRACE)
    assert len(requests) == 12031
    mean_in = statistics.mean(r.input_tokens for r in requests)
    mean_out = statistics.mean(r.output_tokens for r in requests)
    ratio = hit_ratio(requests)
    with capsys.disabled():
        print(f"\nMooncake conversation trace: {len(requests)} requests over {requests[-1].arrival_s:.0f} s, "
              f"mean input {mean_in:.0f}, mean output {mean_out:.0f}, prefix hit ratio {100 * ratio:.1f}%")
    assert mean_in == pytest.approx(12035, rel=0.01)
    assert mean_out == pytest.approx(343, rel=0.01)
    assert ratio == pytest.approx(0.37, abs=0.03)
    assert 3000 < requests[-1].arrival_s < 3600, "about 59 minutes"
    assert load_mooncake(REAL_TRACE, limit=100) == requests[:100]


def test_replay_makes_one_turn_agents_with_their_prefix_hit_in_storage(tmp_path):
    from traffic.traces import play, replay
    from traffic.workload import WorkloadSpec

    rows = [req(0, 1500, 10, [1, 2, 3]), req(2000, 1024, 0, [1, 2]), req(4000, 2000, 5, [1, 2, 9, 3])]
    trajectories, starts = replay(load_mooncake(write_jsonl(tmp_path, rows)), speed=2.0)
    assert starts == [0.0, 1.0, 2.0]  # timestamps / speed
    turns = [t.turns[0] for t in trajectories]
    assert [(u.context_before_tokens, u.append_tokens, u.gen_tokens) for u in turns] == [
        (0, 1500, 10),     # cold
        (1023, 1, 1),      # all 2 blocks hit: one token is still prefilled; an empty output decodes one token
        (1024, 976, 5)]    # blocks 1, 2 hit, 9 is new
    assert [t.preloaded_tokens for t in trajectories] == [0, 1023, 1024]
    spec = WorkloadSpec(trace_file=str(write_jsonl(tmp_path, rows)), trace_requests=2, trace_speed=1.0)
    assert not spec.offline
    played, starts = play(spec)
    assert len(played) == 2 and starts == [0.0, 2.0]
    generated, zero = play(WorkloadSpec(agents=3, turns_per_agent=2))  # no trace: the workload model, offline
    assert len(generated) == 3 and zero == [0.0, 0.0, 0.0]


def test_a_scenario_trace_is_read_and_checked_before_anything_is_built(tmp_path):
    from emulator.errors import ConfigError
    from scenarios import schema

    good = write_jsonl(tmp_path, [req(0, 1500, 10, [1, 2, 3])])
    sc = schema.load("default", [f"serving.workload.trace={{file: {good}, requests: 1, speed: 4}}"])
    assert sc.serving.workload.trace.speed == 4
    bad = write_jsonl(tmp_path, [req(0, 1500, 10, [1, "x"])], name="bad.jsonl")
    with pytest.raises(ConfigError, match=r"serving.workload.trace: .*bad.jsonl:1: hash_ids\[1\] is 'x'"):
        schema.load("default", [f"serving.workload.trace={{file: {bad}}}"])
    with pytest.raises(ConfigError, match="cannot read trace .*missing.jsonl"):
        schema.load("default", [f"serving.workload.trace={{file: {tmp_path}/missing.jsonl}}"])
    with pytest.raises(ConfigError, match="a trace brings its own arrival times"):
        schema.load("default", [f"serving.workload.trace={{file: {good}}}", "serving.workload.arrival_rate=2"])


def test_skipped_requests_warm_the_cache_and_are_not_played(tmp_path):
    from traffic.traces import replay

    rows = [req(0, 1024, 1, [1, 2]), req(1000, 1536, 1, [1, 2, 3]), req(3000, 2048, 1, [1, 2, 3, 4])]
    trajectories, starts = replay(load_mooncake(write_jsonl(tmp_path, rows)), skip=1)
    assert starts == [0.0, 2.0]  # from the first replayed request
    assert [t.turns[0].context_before_tokens for t in trajectories] == [1024, 1536]  # hits on the skipped one's

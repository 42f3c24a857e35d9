"""TcSampler's per-key index answers exactly what a scan of every sample answered (nearest samples, ties to
the earliest), also for samples appended by hand and out of time order."""

from __future__ import annotations

import random

from emulator.monitor import ClassKey, ClassSample, TcSampler

KEYS = [ClassKey(None, f"eth{i}", 0x10010) for i in range(3)]


def _scan(samples, key, t0, t1):  # the definition: the samples nearest to t0 and t1, by a plain scan
    pts = [s for s in samples if s.key == key]
    if len(pts) < 2:
        return None
    a = min(pts, key=lambda s: abs(s.t_s - t0))
    b = min(pts, key=lambda s: abs(s.t_s - t1))
    if b.t_s <= a.t_s:
        return None
    return b.bytes - a.bytes, b.packets - a.packets, b.t_s - a.t_s


def test_counts_match_a_scan_of_every_sample():
    rng = random.Random(7)
    sampler = TcSampler(KEYS)
    t = 0.0
    for step in range(400):
        t += rng.choice([0.0, 0.05, 0.1, 0.1, 0.25])  # repeated instants give ties
        key = rng.choice(KEYS)
        sampler.samples.append(ClassSample(t, key, step * 1000, step, 0, 0))
        if step % 50 == 0:  # queries between appends: the index must take in what came since
            for k in KEYS:
                assert sampler.counts(k, t / 3, t / 2) == _scan(sampler.samples, k, t / 3, t / 2)
    for _ in range(2000):
        k = rng.choice(KEYS + [ClassKey("ns", "x", 1)])
        t0 = rng.uniform(-1, t + 1)
        t1 = rng.choice([t0, rng.uniform(-1, t + 1), round(t0 * 20) / 20])
        assert sampler.counts(k, t0, t1) == _scan(sampler.samples, k, t0, t1), (k, t0, t1)


def test_samples_appended_out_of_time_order_are_found():
    sampler = TcSampler(KEYS)
    k = KEYS[0]
    sampler.samples += [ClassSample(2.0, k, 200, 2, 0, 0), ClassSample(1.0, k, 100, 1, 0, 0),
                        ClassSample(3.0, k, 300, 3, 0, 0)]
    assert sampler.counts(k, 1.0, 3.0) == (200, 2, 2.0) == _scan(sampler.samples, k, 1.0, 3.0)
    assert sampler.rate_bps(k, 0.9, 2.1) == 100 * 8 / 1.0

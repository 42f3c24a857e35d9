"""scenarios.schema: every bad scenario is refused with file, field path and reason."""

from __future__ import annotations

import pytest
import yaml

from emulator.errors import ConfigError
from scenarios import schema
from scenarios.plan import make_plan

SHIPPED = [p.stem for p in schema.list_shipped()]


def refused(path: str, sets: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        schema.load(path, sets)
    return str(exc.value)


def set_in(data: dict, dotted: str, value) -> dict:
    node = data
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return data


# -- shipped scenarios -------------------------------------------------------
def test_the_three_scenarios_ship():
    assert {"default", "cluster", "tiny", "calibrate_all"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenario_loads_and_plans_without_problems(name):
    sc = schema.load(name)
    assert sc.name == name  # the file's name field matches its file name
    assert make_plan(sc).problems == ()


@pytest.mark.parametrize("name", SHIPPED)
def test_resolved_scenario_reloads_to_the_same_scenario(name):
    sc = schema.load(name)
    again = schema.from_dict(yaml.safe_load(yaml.safe_dump(sc.resolved())), "resolved.yaml")
    assert again == sc


def test_default_values_in_real_units():
    sc = schema.load("cluster")
    c = sc.cluster_spec()
    assert (c.prefill_nodes, c.decode_nodes, c.gpus_per_node) == (2, 4, 8)
    assert (c.cnic_rate_bps, c.snic_rate_bps) == (400e9, 400e9)
    assert (c.storage_servers, c.storage_nic_rate_bps) == (2, 1600e9)
    assert c.dram_buffer_bytes == 64e9
    assert sc.scale_spec().rate_factor == pytest.approx(1e-4)
    assert sc.emulation.queue == pytest.approx(0.010)
    assert sc.calibration.duration == 5.0


def test_cluster_spec_maps_every_field(write_scenario):
    """Distinct values per field, so a swapped positional argument shows."""
    path = write_scenario({
        "name": "mapping",
        "cluster": {"model": "qwen32b", "prefill_nodes": 3, "decode_nodes": 5, "gpus_per_node": 4,
                    "cnic_rate": "200Gbit", "snic_rate": "100Gbit", "dram_buffer": "32GB",
                    "storage": {"servers": 7, "nic_rate": "1000Gbit"}},
        "scale": {"bytes": 0.001, "time": 2.0},
    }, "mapping.yaml")
    sc = schema.load(path)
    c = sc.cluster_spec()
    assert c.prefill_nodes == 3 and c.decode_nodes == 5 and c.gpus_per_node == 4
    assert c.cnic_rate_bps == 200e9 and c.snic_rate_bps == 100e9
    assert c.storage_servers == 7 and c.storage_nic_rate_bps == 1000e9
    assert c.dram_buffer_bytes == 32e9 and c.model == "qwen32b"
    s = sc.scale_spec()
    assert (s.byte_scale, s.time_scale) == (0.001, 2.0)


def test_defaults_filled_in(tiny_data, write_scenario):
    sc = schema.load(write_scenario(tiny_data, "tiny2.yaml"))
    assert sc.cluster.cnic_rate == 400e9 and sc.cluster.snic_rate == 400e9
    assert sc.emulation.tcp_cc == "reno" and sc.calibration.mode == "class"


# -- refused fields (file name, dotted path, reason) --------------------------
BAD_FIELDS = [
    # (dotted path, value, words of the reason)
    ("cluster.snic_rat", "40Gbit", "unknown key"),
    ("cluster.storage.nic_rat", "40Gbit", "unknown key"),
    ("cluster.snic_rate", 40, "has no unit"),
    ("cluster.snic_rate", "40", "has no unit"),
    ("cluster.cnic_rate", "0Gbit", "> 0"),
    ("cluster.snic_rate", "-5Gbit", "not a rate"),
    ("cluster.storage.nic_rate", "0Gbit", "> 0"),
    ("cluster.storage.nic_rate", "-5Gbit", "not a rate"),
    ("cluster.dram_buffer", "64", "has no unit"),
    ("cluster.prefill_nodes", 0, "greater than or equal to 1"),
    ("cluster.decode_nodes", 0, "greater than or equal to 1"),
    ("cluster.decode_nodes", -2, "greater than or equal to 1"),
    ("cluster.prefill_nodes", 255, "less than or equal to 254"),
    ("cluster.gpus_per_node", 33, "less than or equal to 32"),
    ("cluster.storage.servers", 0, "greater than or equal to 1"),
    ("cluster.model", "gpt5", "ds660b"),
    ("name", "my run", "not a valid identifier"),
    ("name", "1abc", "not a valid identifier"),
    ("name", "a/b", "not a valid identifier"),
    ("scale.bytes", 0, "greater than 0"),
    ("scale.bytes", 1.5, "less than or equal to 1"),
    ("scale.bytes", -1e-4, "greater than 0"),
    ("scale.time", 0, "greater than 0"),
    ("emulation.queue", "10", "has no unit"),
    ("emulation.queue", "0ms", "> 0"),
    ("emulation.tcp_cc", "cubic", "reno"),
    ("calibration.mode", "some", "class"),
    ("calibration.duration", "2s", "at least 3s"),
    ("colour", "blue", "unknown key"),
]


@pytest.mark.parametrize("dotted, value, reason", BAD_FIELDS)
def test_bad_field_refused_with_file_path_and_reason(tiny_data, write_scenario, dotted, value, reason):
    path = write_scenario(set_in(tiny_data, dotted, value), "bad.yaml")
    msg = refused(path)
    assert msg.startswith(f"bad.yaml: {dotted}: "), msg
    assert reason in msg


@pytest.mark.parametrize("dotted, value, reason", BAD_FIELDS)
def test_from_dict_names_where(tiny_data, dotted, value, reason):
    with pytest.raises(ConfigError) as exc:
        schema.from_dict(set_in(tiny_data, dotted, value), "given.yaml")
    assert exc.value.where == f"given.yaml: {dotted}"
    assert reason in exc.value.reason


@pytest.mark.parametrize("dotted", ["name", "cluster", "scale", "cluster.prefill_nodes", "cluster.decode_nodes",
                                    "scale.bytes"])
def test_missing_required_key(tiny_data, write_scenario, dotted):
    keys = dotted.split(".")
    node = tiny_data
    for k in keys[:-1]:
        node = node[k]
    del node[keys[-1]]
    msg = refused(write_scenario(tiny_data))
    assert msg.startswith(f"bad.yaml: {dotted}: required key is missing"), msg


def test_every_error_is_named(tiny_data, write_scenario):
    tiny_data["cluster"]["prefill_nodes"] = 0
    tiny_data["cluster"]["decode_nodes"] = 0
    tiny_data["scale"]["bytes"] = 2
    msg = refused(write_scenario(tiny_data))
    lines = msg.splitlines()
    assert lines[0].startswith("bad.yaml: cluster.prefill_nodes: ")
    assert [line.split(": ")[1] for line in lines] == ["cluster.prefill_nodes", "cluster.decode_nodes",
                                                        "scale.bytes"]


def test_section_that_is_not_a_mapping(tiny_data, write_scenario):
    tiny_data["cluster"] = 5
    msg = refused(write_scenario(tiny_data))
    assert msg.startswith("bad.yaml: cluster: ")


def test_malformed_yaml(write_scenario):
    msg = refused(write_scenario("name: tiny\ncluster: {prefill_nodes: 1, decode_nodes: [\n"))
    assert msg.startswith("bad.yaml: not valid YAML")
    assert "line" in msg  # points at where it broke


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_file_that_is_not_a_mapping(write_scenario, text):
    msg = refused(write_scenario(text))
    assert msg == "bad.yaml: a scenario must be a YAML mapping"


def test_missing_file(tmp_path):
    msg = refused(str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in msg and "no such scenario file" in msg


def test_unknown_shipped_name():
    msg = refused("no_such_scenario")
    assert msg.startswith("no_such_scenario: no such scenario")


def test_config_error_is_one_line(tiny_data, write_scenario):
    tiny_data["cluster"]["snic_rate"] = "40"
    assert "\n" not in refused(write_scenario(tiny_data))


# -- --set overrides -----------------------------------------------------------
def test_set_overrides_a_nested_value():
    sc = schema.load("tiny", ["cluster.prefill_nodes=3", "cluster.storage.nic_rate=800Gbit"])
    assert sc.cluster.prefill_nodes == 3
    assert sc.cluster.storage.nic_rate == 800e9


def test_set_creates_a_missing_section():
    sc = schema.load("tiny", ["emulation.queue=20ms"])  # tiny.yaml has no emulation section
    assert sc.emulation.queue == pytest.approx(0.020)


def test_set_value_parsed_as_yaml_scalar():
    sc = schema.load("tiny", ["scale.bytes=0.0005", "name=tiny_x"])
    assert sc.scale.bytes == 0.0005 and sc.name == "tiny_x"


def test_set_does_not_mutate_its_input(tiny_data):
    before = yaml.safe_dump(tiny_data)
    schema.apply_overrides(tiny_data, ["cluster.prefill_nodes=9"], "tiny.yaml")
    assert yaml.safe_dump(tiny_data) == before


@pytest.mark.parametrize("item, path, reason", [
    ("cluster.prefill_nodes=0", "cluster.prefill_nodes", "greater than or equal to 1"),
    ("cluster.snic_rate=40", "cluster.snic_rate", "has no unit"),
    ("cluster.snic_rat=40Gbit", "cluster.snic_rat", "unknown key"),
    ("scale.bytes=0", "scale.bytes", "greater than 0"),
    ("name=my run", "name", "not a valid identifier"),
])
def test_set_to_a_bad_value_is_refused(item, path, reason):
    msg = refused("tiny", [item])
    assert msg.startswith(f"tiny.yaml: {path}: ")
    assert reason in msg


def test_set_without_equals_refused():
    with pytest.raises(ConfigError) as exc:
        schema.apply_overrides({"name": "x"}, ["cluster.prefill_nodes"], "tiny.yaml")
    assert "cluster.prefill_nodes" in str(exc.value)
    assert "KEY=VALUE" in str(exc.value)


def test_set_on_a_non_section_refused():
    with pytest.raises(ConfigError) as exc:
        schema.apply_overrides({"name": "tiny"}, ["name.first=1"], "tiny.yaml")
    assert "name.first" in str(exc.value)
    assert "name is not a section" in str(exc.value)


@pytest.mark.parametrize("item", ["cluster.prefill_nodes", "name.first=1"])
def test_set_errors_name_the_file(item):
    msg = refused("tiny", [item])
    assert "tiny.yaml" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_set_on_a_file_that_is_not_a_mapping(write_scenario, text):
    msg = refused(write_scenario(text), ["name=x"])
    assert msg.startswith("bad.yaml: ")


@pytest.mark.parametrize("dotted", ["cluster.prefill_nodes", "cluster.decode_nodes", "cluster.gpus_per_node"])
def test_boolean_node_count_refused(tiny_data, write_scenario, dotted):
    refused(write_scenario(set_in(tiny_data, dotted, True)))


def test_resolved_keeps_rates_exactly(tiny_data, write_scenario):
    tiny_data["cluster"]["snic_rate"] = "401.25Gbit"
    sc = schema.load(write_scenario(tiny_data, "precise.yaml"))
    again = schema.from_dict(sc.resolved(), "resolved.yaml")
    assert again.cluster.snic_rate == sc.cluster.snic_rate == 401.25e9


@pytest.mark.parametrize("sets, match", [
    (["traffic_classes.dscp_kv=46"], "dscp_collective and dscp_kv are both 46"),
    (["traffic_classes.collective_share=0.99", "traffic_classes.kv_share=0.01"], "at most 0.995"),
    (["traffic_classes.dscp_kv=64"], "traffic_classes.dscp_kv"),
    (["traffic_classes.isolation=maybe"], "traffic_classes.isolation"),
])
def test_bad_traffic_classes_refused(sets, match):
    with pytest.raises(ConfigError, match=match):
        schema.load("tiny", sets)


def test_isolation_off_means_one_fifo_class():
    assert schema.load("tiny", ["traffic_classes.isolation=false"]).traffic_classes.classes() == ()
    names = [c.name for c in schema.load("tiny").traffic_classes.classes()]
    assert names == ["collective", "kv"]


def test_isolation_compare_needs_collectives_and_a_reference():
    with pytest.raises(ConfigError, match="isolation_compare needs collectives"):
        schema.load("isolation", ["serving.collectives=false"])
    with pytest.raises(ConfigError, match="oracle"):
        schema.load("isolation", ["serving.modes=[dualpath]"])
    assert schema.load("isolation").serving.isolation_compare

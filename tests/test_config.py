"""One parser for YAML and Flower's run config; errors name the key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from common.config import (SECTIONS, Config, ConfigError, from_mapping, from_run_config,
                           load_yaml)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "simulations" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_says_how_to_run_it(path):
    cfg = load_yaml(path)
    assert isinstance(cfg, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#")
    assert f"fedcare simulate simulations/configs/{path.name}" in path.read_text()


def test_shipped_configs_exist():
    assert any(p.name == "default.yaml" for p in CONFIGS)


def test_pyproject_run_config_declares_every_field_with_its_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = {f"{section}.{key}": value for section, values in declared.items()
            for key, value in values.items()}
    assert set(flat) == set(Config().to_run_config())
    assert from_run_config(flat) == from_run_config(Config().to_run_config())


def test_run_config_round_trip_keeps_every_value():
    cfg = from_mapping({"lora": {"target_modules": ["query", "key", "value"]},
                        "privacy": {"target_epsilon": 3}})
    assert from_run_config(cfg.to_run_config()) == cfg
    assert cfg.lora.target_modules == ("query", "key", "value")


@pytest.mark.parametrize("data, message", [
    ({"privacy": {"target_epsilon": -1}}, "privacy.target_epsilon must be > 0 (got -1.0)"),
    ({"privacy": {"delta": 2}}, "privacy.delta must be in (0, 1)"),
    ({"train": {"batch_sze": 3}}, "train.batch_sze is not a known setting"),
    ({"train": {"batch_size": "big"}}, "train.batch_size must be an integer (got 'big')"),
    ({"train": {"device": "tpu"}}, "train.device must be one of ['auto', 'cpu', 'cuda']"),
    ({"privacy": {"enabled": "yes"}}, "privacy.enabled must be true or false"),
    ({"federation": {"num_rounds": 0}}, "federation.num_rounds must be >= 1"),
    ({"data": {"source": "files"}}, "data.labels must be at least two label names"),
    ({"data": {"source": "files", "labels": ["a", "b"], "site_files": ["x.csv"]}},
     "simulation.num_sites must equal the number of data.site_files (1) (got 4)"),
    ({"nonsense": {}}, "nonsense is not a known section"),
])
def test_bad_values_name_the_key_and_the_value(data, message):
    with pytest.raises(ConfigError) as err:
        from_mapping(data)
    assert message in str(err.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("privacy:\n  target_epsilon: zero\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: privacy\.target_epsilon must be a number"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_overrides_apply_on_top_of_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("privacy:\n  target_epsilon: 2.0\n")
    cfg = load_yaml(path, {"privacy.delta": 1e-6, "train.local_steps": 3})
    assert (cfg.privacy.target_epsilon, cfg.privacy.delta, cfg.train.local_steps) == (2.0, 1e-6, 3)


def test_every_section_is_a_frozen_dataclass():
    for cls in SECTIONS.values():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "my_hospitals.yaml"],
                         ids=lambda p: p.name)
def test_every_shipped_private_config_has_a_delta_its_sites_accept(path):
    """A site refuses δ above 1/(10 n): a shipped config whose sites would all refuse
    (the pooled site holds every record) trains nothing."""
    from client.budget import Policy
    from common.data import federated_data

    cfg = load_yaml(path)
    if not cfg.privacy.enabled:
        return
    sites, _ = federated_data(cfg.data, cfg.simulation.num_sites, cfg.site.min_val_records)
    for site in sites:
        Policy(8.0, cfg.privacy.delta).check_delta(len(site.train))


def test_the_trimmed_mean_is_refused_with_private_sites_naming_the_rule_to_use():
    from common.config import check_aggregation, check_simulation

    rule = {"aggregation": "trimmed_mean", "secure_aggregation": "off"}
    private = from_mapping({"federation": rule, "simulation": {"num_sites": 5}})
    for check in (check_simulation, check_aggregation):  # a simulation's door, the server's
        with pytest.raises(ConfigError, match=r"federation\.aggregation 'trimmed_mean' does "
                                              r"not hold with privacy\.enabled.*Use aggregation "
                                              r"'krum'"):
            check(private)
    plain = from_mapping({"federation": rule, "privacy": {"enabled": False},
                          "simulation": {"num_sites": 5}})
    assert check_simulation(plain).federation.aggregation == "trimmed_mean"


@pytest.mark.parametrize("sites, share, min_sites, why", [
    (4, 0.2, 2, r"no faulty site among the 4 sites .* average them all"),
    (5, 0.4, 2, r"f = 2 faulty of the 5 sites .* more than 2f \+ 2 = 6"),
    (3, 0.34, 2, r"f = 1 faulty of the 3 sites .* more than 2f \+ 2 = 4"),
])
def test_krum_with_too_few_simulated_sites_for_its_faulty_share_is_refused(
        sites, share, min_sites, why):
    from common.config import check_simulation

    cfg = from_mapping({"federation": {"aggregation": "krum", "secure_aggregation": "off",
                                       "faulty_share": share, "min_sites": min_sites},
                        "simulation": {"num_sites": sites}})
    with pytest.raises(ConfigError, match=r"federation\.aggregation 'krum' with simulation"
                                          rf"\.num_sites {sites} assumes " + why):
        check_simulation(cfg)


def test_krum_with_enough_sites_for_its_faulty_share_passes():
    from common.config import check_simulation

    for sites, share in ((5, 0.2), (10, 0.3), (6, 0.2)):
        cfg = from_mapping({"federation": {"aggregation": "krum", "secure_aggregation": "off",
                                           "faulty_share": share},
                            "simulation": {"num_sites": sites}})
        assert check_simulation(cfg) is cfg


@pytest.mark.parametrize("value", [-0.1, 1.5, "half"])
def test_a_gpu_share_outside_zero_to_one_is_refused_by_name(value):
    with pytest.raises(ConfigError, match=r"simulation\.gpus_per_site must be (in \[0, 1\] "
                                          r"\(a share of one GPU; 0 = 1/num_sites\)|a number)"):
        from_mapping({"simulation": {"gpus_per_site": value}})


@pytest.mark.parametrize("share, device, cuda, gpus", [
    (0.0, "cuda", True, 1 / 3),   # the default: the GPU shared evenly by the 3 sites
    (0.0, "auto", True, 1 / 3),
    (0.3, "cuda", True, 0.3),     # as set: three sites at once on one GPU
    (1.0, "auto", True, 1.0),     # one site at a time
    (0.3, "cpu", True, 0.0),      # the sites train on the CPU: no GPU is reserved
    (0.3, "auto", False, 0.0),    # no CUDA device
])
def test_each_site_reserves_its_cpus_and_its_share_of_the_gpu(share, device, cuda, gpus):
    from simulations.run import site_resources

    sim = from_mapping({"simulation": {"num_sites": 3, "cpus_per_site": 2,
                                       "gpus_per_site": share}}).simulation
    assert site_resources(sim, device, cuda) == {"num_cpus": 2.0, "num_gpus": pytest.approx(gpus)}


def test_every_dependency_is_pinned_in_constraints_at_a_version_it_admits():
    """pyproject.toml says what fedcare runs with (torch as a range, so a GPU machine
    keeps its own build); constraints.txt says what CI tests. `make install` applies
    both, so a requirement that rejects its own pin would fail every fresh install."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in (*project["dependencies"],
                                       *project["optional-dependencies"]["test"])]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pin = Requirement(line)
            (spec,) = pin.specifier
            assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
            pins[canonicalize_name(pin.name)] = spec.version
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{requirement} rejects constraints.txt's {name}=={pins[name]}"
    (torch,) = [r for r in wanted if canonicalize_name(r.name) == "torch"]
    assert not torch.specifier.contains("2.10.0"), "torch below 2.11 was never tested"

"""DP-SGD at a site: the mechanism is what it claims, and ε is accounted across rounds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from client.budget import Policy
from client.site import Site, SiteTrainer
from client.training import PrivateStep, noise_step, private_batch, train_private
from common.config import LoraConfig
from common.data import read_records, site_split
from common.evaluation import collate, encode
from common.model import build_model, load_tokenizer
from common.privacy import accounting
from tests.conftest import LABELS, tiny_config

DEVICE = torch.device("cpu")


@pytest.fixture()
def setup(tiny_model, site_files):
    torch.manual_seed(0)
    model = build_model(str(tiny_model), len(LABELS), LoraConfig(r=2, alpha=4))
    ds = read_records(site_files["sites"][0], "note", "diagnosis", LABELS)
    data = encode(ds, load_tokenizer(str(tiny_model)), 16)
    return model, data


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_dp_step_changes_lora_and_head_and_nothing_else(setup):
    model, data = setup
    before = _params(model)
    accountant = accounting.make_accountant([])
    step = PrivateStep(noise_multiplier=1.0, sample_rate=0.2, steps=2, max_grad_norm=1.0)
    stats = train_private(model, data, step, 0.05, 8, DEVICE, accountant,
                          torch.Generator().manual_seed(1))
    after = _params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert any("lora_B" in n for n in changed)
    assert accountant.history == [(1.0, 0.2, 2)]
    assert stats.steps == 2 and np.isfinite(stats.loss)
    # hooks are gone: the model can be wrapped again next round
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None
                   for p in model.parameters())
    GradSampleModule(model)._close()


def test_progress_is_told_of_every_step_that_trained_on_records(setup):
    """The bench times DP steps by these calls: a record-level step reports too."""
    model, data = setup
    calls = []
    stats = train_private(model, data, PrivateStep(1.0, 0.5, 3, 1.0), 0.05, 8, DEVICE,
                          accounting.make_accountant([]), torch.Generator().manual_seed(1),
                          progress=lambda k, loss: calls.append((k, loss)))
    assert [k for k, _ in calls] == [1, 2, 3] and stats.empty_batches == 0
    assert all(np.isfinite(loss) for _, loss in calls)


def _private_round(model, data, sigma, q, steps, seed):
    accountant = accounting.make_accountant([])
    stats = train_private(model, data, PrivateStep(sigma, q, steps, 1.0), 0.05, 8, DEVICE,
                          accountant, torch.Generator().manual_seed(seed))
    return stats, accountant


def _moved(before, model):
    """Largest change of any parameter, by name."""
    return {n: (p.detach() - before[n]).abs().max().item()
            for n, p in model.named_parameters()}


def test_an_empty_batch_is_a_noise_only_step_accounted_once(setup):
    """As in Opacus, an empty Poisson batch still adds noise and steps: an update that
    did not move would tell that the batch was empty."""
    model, data = setup
    start = copy.deepcopy(model)
    moved = {}
    for sigma in (1.0, 1e-12):
        model = copy.deepcopy(start)
        before = _params(model)
        stats, accountant = _private_round(model, data, sigma, 1e-6, 3, seed=1)
        assert (stats.empty_batches, stats.examples, stats.steps) == (3, 0, 3)
        assert accountant.history == [(sigma, 1e-6, 3)]  # the hook's, once per step
        moved[sigma] = _moved(before, model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {n for n, d in moved[sigma].items() if d > 0} == trainable
    # the change is the noise: Adam turns noise far above its eps (1e-8) into steps of
    # about lr, and noise far below it into almost nothing
    assert max(moved[1e-12].values()) < 1e-2 * max(moved[1.0].values())


def test_a_noise_only_step_adds_sigma_c_noise_over_the_expected_batch(setup):
    model, _ = setup
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    sigma, clip, expected = 2.0, 0.5, 4
    GradSampleModule(model)  # noise_step needs no hooks; wrapped as in train_private
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma,
                            max_grad_norm=clip, expected_batch_size=expected,
                            loss_reduction="mean", generator=torch.Generator().manual_seed(7))
    accountant = accounting.make_accountant([])
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=0.1))
    noise_step(optimizer)
    again = torch.Generator().manual_seed(7)
    for p, b in zip(params, before):
        noise = torch.normal(0, sigma * clip, p.shape, generator=again)
        torch.testing.assert_close(b - p.detach(), noise / expected)
    assert accountant.history == [(sigma, 0.1, 1)]


def test_empty_and_full_batches_together_are_accounted_once_per_step(setup):
    model, data = setup
    stats, accountant = _private_round(model, data, 1.0, 1 / len(data), 12, seed=3)
    assert 0 < stats.empty_batches < 12 and stats.examples > 0  # both kinds ran
    assert accountant.history == [(1.0, 1 / len(data), 12)]


def test_the_noise_is_derived_from_the_callers_seed_alone(setup):
    """Same seed, same round (whatever torch's global RNG holds); another seed, other
    noise. Every batch is empty, so only the noise can differ."""
    model, data = setup
    results = []
    for seed, global_seed in ((5, 0), (5, 1), (6, 0)):
        trained = copy.deepcopy(model)
        torch.manual_seed(global_seed)
        _private_round(trained, data, 1.0, 1e-6, 2, seed=seed)
        results.append(_params(trained))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(torch.equal(results[0][n], results[1][n]) for n in names)
    assert not any(torch.equal(results[0][n], results[2][n]) for n in names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_private_training_runs_on_cuda(setup):
    """The noise generator lives on the model's device; sampling stays on the CPU."""
    model, data = setup
    cuda = torch.device("cuda")
    model.to(cuda)
    before = _params(model)
    accountant = accounting.make_accountant([])
    step = PrivateStep(noise_multiplier=1.0, sample_rate=0.2, steps=2, max_grad_norm=1.0)
    stats = train_private(model, data, step, 0.05, 8, cuda, accountant,
                          torch.Generator().manual_seed(1))
    changed = {n for n, d in _moved(before, model).items() if d > 0}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert accountant.history == [(1.0, 0.2, 2)] and np.isfinite(stats.loss)
    assert all(p.device.type == "cuda" for p in model.parameters())

def test_per_sample_gradients_match_one_example_at_a_time(setup):
    model, data = setup
    rows = [0, 1, 2, 3, 4]
    gsm = GradSampleModule(model, loss_reduction="sum")
    ids, mask, labels = collate(data, rows, DEVICE)
    F.cross_entropy(gsm(input_ids=ids, attention_mask=mask).logits, labels,
                    reduction="sum").backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_sample = {n: p.grad_sample.clone() for n, p in params}
    gsm._close()
    for k, row in enumerate(rows):
        model.zero_grad()
        ids, mask, labels = collate(data, [row], DEVICE)
        F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
        for n, p in params:
            torch.testing.assert_close(per_sample[n][k], p.grad, atol=1e-6, rtol=1e-4)


def test_chunked_step_equals_clipped_sum_over_expected_batch(setup):
    """With σ=0 and SGD(lr=1), one chunked step moves the weights by exactly
    -Σ clip(g_i, C) / E[B]: the clipping, the chunking and the scaling are right."""
    model, data = setup
    rows, clip, expected_batch = list(range(10)), 0.05, 12
    params = [p for p in model.parameters() if p.requires_grad]
    manual = [torch.zeros_like(p) for p in params]
    for row in rows:
        model.zero_grad()
        ids, mask, labels = collate(data, [row], DEVICE)
        F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
        grads = [p.grad.clone() for p in params]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        factor = min(1.0, clip / (norm.item() + 1e-6))
        for m, g in zip(manual, grads):
            m += g * factor
    model.zero_grad()
    before = [p.detach().clone() for p in params]
    gsm = GradSampleModule(model, loss_reduction="mean")
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0,
                            max_grad_norm=clip, expected_batch_size=expected_batch,
                            loss_reduction="mean")
    private_batch(gsm, optimizer, data, rows, chunk_size=3, device=DEVICE)  # 4 chunks
    gsm._close()
    for p, b, m in zip(params, before, manual):
        torch.testing.assert_close(b - p.detach(), m / expected_batch, atol=1e-6, rtol=1e-4)


def test_epsilon_accumulates_across_rounds_like_one_accountant(tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files)
    ds = read_records(site_files["sites"][0], "note", "diagnosis", LABELS)
    site = Site("site0", site_split(ds, 0.1, 0), LABELS,
                Policy(8.0, 1e-5, release_evaluation=False), tmp_path / "s0")
    eps = []
    for round_no in (1, 2):
        trainer = SiteTrainer(cfg, site)  # a new trainer each round, as in Flower
        eps.append(trainer.fit(round_no, 2, "run-a")["metrics"]["epsilon"])
    size, *history = SiteTrainer(cfg, site).guard().history()
    assert size == (cfg.privacy.count_noise, 1.0, 1)  # the noisy size, released once
    sigma, q = history[0][0], history[0][1]
    assert {(s, r) for s, r, _ in history} == {(sigma, q)}  # σ planned once for the run
    assert sum(n for _, _, n in history) == 2 * cfg.train.local_steps
    assert eps[1] > eps[0] > 0
    single = accounting.make_accountant([])
    single.step(noise_multiplier=size[0], sample_rate=1.0)
    for _ in range(2 * cfg.train.local_steps):
        single.step(noise_multiplier=sigma, sample_rate=q)
    assert eps[1] == pytest.approx(single.get_epsilon(cfg.privacy.delta), rel=1e-9)
    # σ was planned so that both rounds together fit the target, not one round each
    assert eps[1] <= cfg.privacy.target_epsilon + 1e-6
    assert eps[1] > 0.9 * cfg.privacy.target_epsilon


def test_a_simulated_site_reuses_its_own_features_across_runs_and_never_another_sites(
        tiny_model, site_files, tmp_path, monkeypatch):
    """simulation.feature_cache_dir: a later run over the same records loads what the
    site computed before (the bench's saving); each site keeps its own folder."""
    import common.data
    from flwr.app import Context, RecordDict

    from client.node import LOG_FILE, site_from_context

    def trainer(run: str, partition: int) -> SiteTrainer:
        monkeypatch.setattr(common.data, "_CACHE", {})  # a fresh process, as Ray's
        cfg = tiny_config(tiny_model, site_files, train={"head_rounds": 1, "head_steps": 2,
                                                          "head_batch_size": 16},
                          site={"state_dir": str(tmp_path / run)},
                          simulation={"num_sites": 2, "feature_cache_dir": str(cache)})
        node = {"partition-id": partition, "num-partitions": 2}
        return SiteTrainer(cfg, site_from_context(cfg, Context(
            run_id=1, node_id=partition + 1, node_config=node, state=RecordDict(),
            run_config=cfg.to_run_config())))

    def computed(run: str, site: str) -> int:
        log = (tmp_path / run / site / LOG_FILE).read_text()
        return log.count("pooled features of ")

    cache = tmp_path / "features"
    first = trainer("run-a", 0)
    first.fit(1, 1, "run-a")
    assert computed("run-a", "site0") == 1
    made = first.features(first.train_data).x
    second = trainer("run-b", 0)
    second.fit(1, 1, "run-b")
    assert computed("run-b", "site0") == 0  # loaded from the site's folder, not made
    torch.testing.assert_close(second.features(second.train_data).x, made)
    assert not (tmp_path / "run-b" / "site0" / "features").exists()
    other = trainer("run-a", 1)  # the other site: its own records, its own folder
    other.fit(1, 1, "run-a")
    assert computed("run-a", "site1") == 1
    assert [len(list((cache / s).glob("*.safetensors"))) for s in ("site0", "site1")] == [1, 1]
    assert {p.name for p in (cache / "site0").iterdir()}.isdisjoint(
        p.name for p in (cache / "site1").iterdir())


def test_a_head_round_trains_the_head_on_cached_features_and_leaves_lora_alone(
        tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files, train={"head_rounds": 1, "head_steps": 3,
                                                      "head_batch_size": 32})
    ds = read_records(site_files["sites"][0], "note", "diagnosis", LABELS)
    site = Site("site0", site_split(ds, 0.1, 0), LABELS, Policy(8.0, 1e-5), tmp_path / "s0")
    trainer = SiteTrainer(cfg, site)
    assert trainer.phase(1).name == "head" and trainer.phase(2).name == "lora"
    before = _params(trainer.model)
    sent = trainer.fit(1, 2, "run-h")["arrays"]
    after = _params(trainer.model)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert [a.size > 0 for a in sent] == ["classifier" in n for n in names]  # head only
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("classifier" in n for n in changed)
    assert len(list((tmp_path / "s0" / "features").glob("*.safetensors"))) == 1  # train
    trainer.evaluate(1, 2, "run-h")
    assert len(list((tmp_path / "s0" / "features").glob("*.safetensors"))) == 2  # + val
    # the cached features are the classifier's own pooled outputs
    from common.evaluation import pooled_features
    from common.model import classifier_of
    fresh = pooled_features(classifier_of(trainer.model), trainer.train_data, DEVICE)
    torch.testing.assert_close(trainer.features(trainer.train_data).x, fresh.x)
    # the ledger holds the head round at its own sampling rate, planned with the LoRA
    # round, both over the noisy size the site released once (never the exact count)
    guard = trainer.guard()
    kinds = [e["kind"] for e in guard.ledger.entries()]
    assert kinds == ["size", "train", "evaluate"]
    n = max(1, round(guard.ledger.entries()[0]["released_value"]))
    sigma_c = cfg.privacy.count_noise
    history = guard.history()
    assert history == [(sigma_c, 1.0, 1), (history[1][0], 32 / n, 3), (sigma_c, 1.0, 1)]
    assert trainer.schedule(1, 2, n) == [(32 / n, 3), (cfg.train.batch_size / n,
                                                       cfg.train.local_steps)]
    trainer.fit(2, 2, "run-h")
    history = trainer.guard().history()
    assert [(q, s) for _, q, s in history] == [(1.0, 1), (32 / n, 3), (1.0, 1),
                                               (cfg.train.batch_size / n, cfg.train.local_steps)]
    assert history[1][0] == history[3][0]  # one σ for the whole run
    eps = accounting.epsilon(history, cfg.privacy.delta)
    # the target covers the run's training and its planned evaluations (one is still to
    # come); the size, released once per data version, is spent from the budget
    assert 0.8 * cfg.privacy.target_epsilon < eps <= cfg.site.epsilon_budget + 1e-6


def test_head_dp_step_clips_per_example_gradients_of_the_head(setup):
    """On features, a σ=0 DP step with SGD(lr=1) moves the head by -Σ clip(g_i)/E[B]."""
    from common.evaluation import pooled_features
    from common.model import classifier_of, trainable_head

    model, data = setup
    feats = pooled_features(classifier_of(model), data, DEVICE)
    head = trainable_head(model)
    rows, clip, expected = list(range(8)), 0.05, 10
    manual = [torch.zeros_like(p) for p in head.parameters()]
    for row in rows:
        head.zero_grad()
        F.cross_entropy(head(feats.x[[row]]), feats.labels[[row]]).backward()
        grads = [p.grad.clone() for p in head.parameters()]
        factor = min(1.0, clip / (torch.sqrt(sum((g ** 2).sum() for g in grads)).item() + 1e-6))
        for m, g in zip(manual, grads):
            m += g * factor
    head.zero_grad()
    before = [p.detach().clone() for p in head.parameters()]
    gsm = GradSampleModule(head, loss_reduction="mean")
    optimizer = DPOptimizer(torch.optim.SGD(list(head.parameters()), lr=1.0),
                            noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=expected, loss_reduction="mean")
    private_batch(gsm, optimizer, feats, rows, chunk_size=3, device=DEVICE)
    gsm._close()
    for p, b, m in zip(head.parameters(), before, manual):
        torch.testing.assert_close(b - p.detach(), m / expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("bad", ["../x", "/etc", "a/b", "", "..", "x" * 200])
def test_a_run_id_that_cannot_name_one_folder_is_refused(bad, tmp_path):
    from client.site import simulated_state_dir
    from common.config import from_mapping

    cfg = from_mapping({"simulation": {"output_dir": str(tmp_path)}})
    with pytest.raises(ValueError, match="cannot name a folder"):
        simulated_state_dir(cfg, bad, "site0")
    assert simulated_state_dir(cfg, "20261129-1", "site0") == \
        tmp_path / "20261129-1" / "site_state" / "site0"


def test_a_gradient_canary_enters_the_sum_as_exactly_c_along_its_coordinate(setup):
    """An audit's gradient canary (scale·C along one head coordinate) is clipped to C by
    the real DPOptimizer, and the rows around it keep their own clipped gradients."""
    from client.training import GradientCanaries
    from common.evaluation import pooled_features
    from common.model import classifier_of, trainable_head

    model, data = setup
    feats = pooled_features(classifier_of(model), data, DEVICE)
    head = trainable_head(model)

    def step(rows, canaries):
        saved = [p.detach().clone() for p in head.parameters()]
        gsm = GradSampleModule(head, loss_reduction="mean")
        optimizer = DPOptimizer(torch.optim.SGD(list(head.parameters()), lr=1.0),
                                noise_multiplier=0.0, max_grad_norm=0.5,
                                expected_batch_size=4, loss_reduction="mean")
        private_batch(gsm, optimizer, feats, rows, 3, DEVICE, canaries)
        gsm._close()
        moved = [b - p.detach() for b, p in zip(saved, head.parameters())]
        with torch.no_grad():
            for p, b in zip(head.parameters(), saved):
                p.copy_(b)
        return moved

    plain = step([0, 1, 2, 3], None)
    alone = step([0, 1, 3], None)
    canary = GradientCanaries(head.weight, {2: 7})  # row 2's gradient is the canary's
    moved = step([0, 1, 2, 3], canary)
    expected_weight = alone[0].flatten().clone()
    expected_weight[7] += 0.5 / 4  # C / E[B] along coordinate 7, nothing else
    torch.testing.assert_close(moved[0].flatten(), expected_weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(moved[1], alone[1], atol=1e-6, rtol=1e-5)  # bias: untouched
    assert not torch.allclose(moved[0], plain[0])

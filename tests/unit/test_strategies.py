"""federated.strategy and federated.fraction_train (ted_fl.continual.strategies): the same replies given to
Flower's own strategies (`aggregate_train` on Messages, after `configure_train` as Flower's `start` calls
it) and to ted-fl's arithmetic give the same model; FedProx's term has gradient mu (w - w_global); the
client draw is seeded, respects the fraction and is Flower's sample size; a tiny one-site run through the
real ServerApp executor and ClientApp (no Ray) equals the centralized run."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi

from ted_fl.config import (
    ExperimentConfig,
    FederatedConfig,
    StrategyName,
    choices,
    set_key,
    strategy_conflicts,
)
from ted_fl.continual import terms as T
from ted_fl.continual.approaches import get_approach
from ted_fl.continual.strategies import (
    FLOWER_DEFAULTS,
    SERVER_OPTIMIZERS,
    STRATEGIES,
    ServerOptimizer,
    sample_clients,
    server_step,
    with_proximal,
)
from ted_fl.data import load_sites
from ted_fl.errors import TedFlError
from ted_fl.federated import messages as M
from ted_fl.federated.server_app import FlowerExecutor
from ted_fl.run.directory import RunDir
from ted_fl.schedule.engine import TrainResult, TrainTask, fedavg, run_schedule
from ted_fl.schedule.in_process import LocalExecutor
from tests.unit.test_privacy_policies import InProcessGrid, _cfg
from tests.unit.test_privacy_policies import task_identity as task_identity  # noqa: F401 (autouse fixture)

FLOWER = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
SHAPES = {"conv.weight": (4, 3, 3), "conv.bias": (4,), "bn.running_mean": (4,)}
NUM_EXAMPLES = (8, 3, 5)  # three clients, unequal: the mean is example-weighted


class NodesGrid:
    """What Flower's FedAvg.configure_train asks of a Grid: the connected node ids."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def _locals(current: dict[str, np.ndarray], rnd: int) -> list[dict[str, np.ndarray]]:
    g = np.random.default_rng(100 + rnd)
    return [{k: (v + g.normal(0, 0.05 * (i + 1), v.shape)).astype(np.float32) for k, v in current.items()}
            for i in range(len(NUM_EXAMPLES))]


def _initial() -> dict[str, np.ndarray]:
    g = np.random.default_rng(7)
    return {k: g.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()}


def _flower_round(strategy: Any, rnd: int, current: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One Flower round as `Strategy.start` runs it: configure_train, the clients' replies, aggregate_train."""
    msgs = list(strategy.configure_train(rnd, M.to_record(current), ConfigRecord({}), NodesGrid(len(NUM_EXAMPLES))))
    assert len(msgs) == len(NUM_EXAMPLES)
    msgs.sort(key=lambda m: m.metadata.dst_node_id)
    replies = [Message(RecordDict({M.WEIGHTS: M.to_record(w), M.METRICS: MetricRecord({"num_examples": n})}),
                       reply_to=m)
               for m, w, n in zip(msgs, _locals(current, rnd), NUM_EXAMPLES, strict=True)]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    assert arrays is not None
    return M.from_record(arrays)


def _flower(name: str, **keys: float) -> Any:
    return FLOWER[name](fraction_train=1.0, min_train_nodes=1, min_available_nodes=1, weighted_by_key="num_examples",
                        arrayrecord_key=M.WEIGHTS, configrecord_key=M.CONFIG, **keys)


def test_strategy_names_are_the_schema() -> None:
    assert STRATEGIES == choices(StrategyName) == ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_defaults_are_flowers(name: str) -> None:
    params = inspect.signature(FLOWER[name].__init__).parameters
    for key, value in FLOWER_DEFAULTS[name].items():
        if key in params:
            assert params[key].default == value, (name, key)
        else:  # FedAdagrad passes beta_1 = beta_2 = 0 to FedOpt itself
            assert getattr(_flower(name), key) == value, (name, key)


@pytest.mark.parametrize("keys", [{}, {"eta": 0.3, "tau": 0.01}], ids=["flower-defaults", "set"])
@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_server_optimizer_is_flowers(name: str, keys: dict[str, float]) -> None:
    """Three rounds of the same replies: Flower's FedAdam / FedYogi / FedAdagrad and ServerOptimizer
    (through the schedule's seam `server_step`, its moments kept in a dict) give the same models."""
    fed = FederatedConfig(strategy=name, **keys)  # type: ignore[arg-type]
    flower = _flower(name, **keys)
    ours_w = flower_w = _initial()
    state: dict[str, Any] = {}
    for rnd in (1, 2, 3):
        flower_next = _flower_round(flower, rnd, flower_w)
        mean = fedavg(list(zip(_locals(ours_w, rnd), NUM_EXAMPLES, strict=True)))
        ours_next = server_step(fed, state, 0, rnd, ours_w, mean)
        for k in SHAPES:
            assert ours_next[k].dtype == np.float32
            np.testing.assert_allclose(ours_next[k], flower_next[k], rtol=0, atol=1e-6, err_msg=f"{name} round {rnd} {k}")
        assert not np.allclose(ours_next["conv.weight"], mean["conv.weight"], atol=1e-4)  # it did step
        ours_w, flower_w = ours_next, flower_next


def test_beta_keys_reach_fedadam_and_fedyogi() -> None:
    for name in ("fedadam", "fedyogi"):
        fed = FederatedConfig(strategy=name, beta_1=0.5, beta_2=0.9)  # type: ignore[arg-type]
        flower, state, w = _flower(name, beta_1=0.5, beta_2=0.9), {}, _initial()
        for rnd in (1, 2):
            a = _flower_round(flower, rnd, w)
            b = server_step(fed, state, 0, rnd, w, fedavg(list(zip(_locals(w, rnd), NUM_EXAMPLES, strict=True))))
            assert all(np.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in SHAPES), name
            w = a
    with pytest.raises(TedFlError, match="federated.beta_1"):
        ServerOptimizer.of(FederatedConfig(strategy="fedadagrad", beta_1=0.5))
    cfg = ExperimentConfig()
    set_key(cfg, "federated.strategy", "fedadagrad")
    set_key(cfg, "federated.beta_2", 0.5)
    with pytest.raises(TedFlError, match="federated.beta_2 = 0.5 is read by federated.strategy = fedadam or fedyogi"):
        strategy_conflicts(cfg)


def test_moments_start_anew_each_stage_and_skip_integer_buffers() -> None:
    opt = ServerOptimizer.of(FederatedConfig(strategy="fedadam"))
    assert opt is not None
    w = {**_initial(), "bn.num_batches_tracked": np.array(3, np.int64)}
    mean = {**_locals(_initial(), 1)[0], "bn.num_batches_tracked": np.array(5, np.int64)}
    first = opt.step(0, 1, w, mean)
    assert first["bn.num_batches_tracked"] == 5
    opt.step(0, 2, first, mean)
    again = opt.step(1, 1, w, mean)  # stage 1, round 1: as if no round had run before
    assert all(np.array_equal(again[k], first[k]) for k in w)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_aggregate_as_flowers(name: str) -> None:
    """FedAvg and FedProx aggregate by the example-weighted mean on the server; FedProx's configure_train
    sends mu to the clients (here: every site reads federated.proximal_mu from the run's configuration)."""
    fed = FederatedConfig(strategy=name, proximal_mu=0.1)  # type: ignore[arg-type]
    cls = FedProx if name == "fedprox" else FedAvg
    flower = cls(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1, weighted_by_key="num_examples",
                 arrayrecord_key=M.WEIGHTS, configrecord_key=M.CONFIG,
                 **({"proximal_mu": fed.proximal_mu} if name == "fedprox" else {}))
    w_f = w_o = _initial()
    for rnd in (1, 2):
        if name == "fedprox":
            msgs = list(flower.configure_train(rnd, M.to_record(w_f), ConfigRecord({}), NodesGrid(3)))
            assert all(m.content[M.CONFIG]["proximal-mu"] == fed.proximal_mu for m in msgs)
        w_f = _flower_round(flower, rnd, w_f)
        w_o = server_step(fed, {}, 0, rnd, w_o, fedavg(list(zip(_locals(w_o, rnd), NUM_EXAMPLES, strict=True))))
        assert all(np.allclose(w_f[k], w_o[k], rtol=0, atol=1e-6) for k in SHAPES)


def test_proximal_gradient_is_mu_times_the_distance() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    mu = 0.37
    appr = with_proximal(get_approach("seq"), model, FederatedConfig(strategy="fedprox", proximal_mu=mu))
    prox = appr.terms[-1]
    assert isinstance(prox.term, T.Proximal) and prox.weight == mu and prox.term.data_independent
    assert get_approach("seq").term_names == ["seg"]  # the registered approach is untouched
    assert with_proximal(get_approach("seq"), model, FederatedConfig()).term_names == ["seg"]  # fedavg: no term
    w_global = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    loss = prox.weight * prox.term(model)
    expected = mu / 2 * sum(float(((p.detach() - w_global[k]) ** 2).sum()) for k, p in model.named_parameters())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, mu * (p.detach() - w_global[k]), rtol=1e-6, atol=1e-7)


def test_sample_clients_is_seeded_and_flowers_size() -> None:
    clients = list(range(7))
    for fraction in (0.1, 0.3, 0.5, 0.99, 1.0):
        k = max(1, int(len(clients) * fraction))
        # Flower's FedAvg samples max(int(n * fraction_train), min_train_nodes) of n nodes
        flower = FedAvg(fraction_train=fraction, min_train_nodes=1, min_available_nodes=1)
        assert len(list(flower.configure_train(1, ArrayRecord(), ConfigRecord({}), NodesGrid(7)))) == k
        draws = [sample_clients(42, s, r, site, clients, fraction) for s in range(3) for r in range(4) for site in (0, 1)]
        assert all(len(d) == k and d == sorted(set(d)) and set(d) <= set(clients) for d in draws)
        assert draws == [sample_clients(42, s, r, site, clients, fraction)
                         for s in range(3) for r in range(4) for site in (0, 1)]
        assert len({tuple(d) for d in draws}) > (1 if k < len(clients) else 0) or k == len(clients)
    assert sample_clients(0, 0, 0, 0, [0], 0.01) == [0]  # at least one client
    assert sample_clients(0, 0, 0, 0, [0, 1, 2], 1.0) == [0, 1, 2]
    assert sample_clients(1, 0, 0, 0, list(range(10)), 0.5) != sample_clients(2, 0, 0, 0, list(range(10)), 0.5)


def test_bad_values_name_the_key() -> None:
    cfg = ExperimentConfig()
    for key, value, text in [("federated.strategy", "fedsgd", "federated.strategy = 'fedsgd' is not one of"),
                             ("federated.fraction_train", 0, "federated.fraction_train"),
                             ("federated.fraction_train", 1.5, "federated.fraction_train"),
                             ("federated.proximal_mu", -0.1, "federated.proximal_mu"),
                             ("federated.eta", -1, "federated.eta")]:
        with pytest.raises(TedFlError, match=text.replace("(", r"\(")):
            set_key(cfg, key, value)


@pytest.mark.parametrize("setting", ["federated.strategy=fedsgd", "federated.fraction_train=0",
                                     "federated.proximal_mu=-1", "federated.beta_1=1.0",
                                     "federated.eta=0.5",  # read by a server optimizer only (strategy fedavg)
                                     "federated.proximal_mu=0.1"])  # read by fedprox only
def test_command_line_exits_2_with_one_line(setting: str, capsys: pytest.CaptureFixture[str]) -> None:
    from ted_fl.simulate import main

    assert main(["--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and setting.split("=")[0] in err


class Recording(FlowerExecutor):
    """The real ServerApp executor, remembering which (site, client) trained in each round."""

    trained: list[tuple[int, int, str, int]]

    def train(self, task: TrainTask) -> list[TrainResult]:
        out = super().train(task)
        self.trained = getattr(self, "trained", []) + [(task.stage, task.round, r.site, r.client) for r in out]
        return out


def test_fraction_train_draws_the_same_clients_in_the_flower_run(tmp_path: Path) -> None:
    """Two sites x 2 clients, fraction 0.5: each round one client per site trains, the one sample_clients
    draws (the centralized runner's site is one client: sample_clients(..., [0], f) = [0] there)."""
    cfg = _cfg(tmp_path, federated__clients_per_site=2, federated__fraction_train=0.5, federated__retention=1)
    cfg.data.order = ["RUNMC", "BMC"]
    run = RunDir.create(tmp_path / "runs", "fraction")
    ex = Recording(InProcessGrid(4), cfg, run)  # type: ignore[arg-type]
    run_schedule(cfg, "seq", 0, ex, run)
    expected = [(stage, rnd, site, c) for stage in (0, 1) for rnd in (0, 1) for i, site in enumerate(cfg.data.order)
                if i <= stage for c in sample_clients(0, stage, rnd, i, [0, 1], 0.5)]
    assert sorted(ex.trained) == sorted(expected)
    assert len({c for *_, c in ex.trained}) > 1  # the draw changes with the round and site


@pytest.mark.parametrize("keys", [dict(federated__strategy="fedadam", federated__fraction_train=0.5),
                                  # 2 steps a round: the proximal gradient is 0 at a round's first step
                                  dict(federated__strategy="fedprox", federated__proximal_mu=0.5,
                                       train__steps_per_round=2)],
                         ids=["fedadam", "fedprox"])
def test_flower_run_equals_the_centralized_run(tmp_path: Path, keys: dict[str, Any]) -> None:
    """One tiny one-site run through the real ServerApp executor and ClientApp equals the in-process run,
    and differs from FedAvg's."""
    cfg = _cfg(tmp_path, **keys)
    cfg.data.order = ["RUNMC"]
    run = RunDir.create(tmp_path / "runs", "fed")
    w_fed = run_schedule(cfg, "seq", 0, FlowerExecutor(InProcessGrid(1), cfg, run), run).weights  # type: ignore[arg-type]
    run = RunDir.create(tmp_path / "runs", "local")
    st = run_schedule(cfg, "seq", 0, LocalExecutor(cfg, load_sites(cfg.data, cfg.data.split_seed)), run)
    assert all(np.allclose(w_fed[k], st.weights[k], rtol=0, atol=1e-6) for k in w_fed)
    base = _cfg(tmp_path, train__steps_per_round=cfg.train.steps_per_round)
    base.data.order = ["RUNMC"]
    run = RunDir.create(tmp_path / "runs", "fedavg")
    w_avg = run_schedule(base, "seq", 0, LocalExecutor(base, load_sites(base.data, base.data.split_seed)), run).weights
    assert not all(np.allclose(w_avg[k], st.weights[k], atol=1e-6) for k in w_avg)

"""Shared fixtures: a real local Ray, tiny models built once per session, a small prepared dataset."""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("THINKREC_PROGRESS", "0")
# Set before anything starts: every process the session starts (Ray's raylet and workers, servers,
# subprocess jobs) inherits it, so pytest_sessionfinish finds what outlived the session.
# Under pytest-xdist each worker is its own session with its own mark (set here, as the worker imports
# this file), and reports what outlived it to the controller (pytest_testnodedown).
SESSION_MARK = "THINKREC_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex

from thinkrec import config as C  # noqa: E402
from thinkrec.runtime import size_local_shuffles, start_local_ray  # noqa: E402

_WORKER_SURVIVORS: list[str] = []  # on the xdist controller: what each worker's session left behind


@pytest.hookimpl(trylast=True)  # after the session fixtures and the local Ray are torn down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No process the session started outlives it (the session fixtures are torn down by now, the
    local Ray shut down): survivors are listed, killed, and fail the run. An xdist worker hands its
    list to the controller, which fails the run; the controller's own children are the workers, which
    xdist shuts down after this hook, so it checks nothing itself."""
    from tests.processes import describe, survivors

    config = session.config
    if _is_xdist_controller(config):
        text = "\n".join(_WORKER_SURVIVORS)
    else:
        left = survivors(SESSION_MARK, os.environ[SESSION_MARK])
        text = describe(left) if left else ""
        for p in left:
            with contextlib.suppress(Exception):
                p.kill()
        if text and hasattr(config, "workerinput"):
            config.workeroutput["survivors"] = text  # sent to the controller after this hook
    if not text:
        return
    config.get_terminal_writer().line(
        f"\nprocesses started by this test session outlived it (killed now):\n{text}", red=True
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _is_xdist_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist: a worker finished; keep what its session left running (its pytest_sessionfinish)."""
    text = getattr(node, "workeroutput", {}).get("survivors")
    if text:
        _WORKER_SURVIVORS.append(f"[{node.gateway.id}]\n{text}")


# -- parallel runs: `make test` runs pytest -n 2 (pytest-xdist) ------------------------------------------
# A module's tests share its module-scoped fixtures (a vLLM engine, a two-node cluster, a trained
# model), so each module runs whole on one worker. Modules that start from one costly session fixture
# share a unit, so it is built once. (xdist's own --dist loadgroup marks units by rewriting node ids,
# which pytest 9 no longer allows, so the scheduler below groups them itself.)
SHARED_GROUP = {"test_ablation": "pipeline_run", "test_pipeline": "pipeline_run"}
# Started first, roughly longest first, so that no long module starts last while the other worker
# sits idle; the rest keep their order. Seconds: estimates for an idle 2-core CPU from one serial run
# on 2026-12-08 whose first half shared the machine with a training run.
LONGEST_FIRST = (
    "pipeline_run",  # 300 s: the shared pipeline run, then the ablation runs from it
    "test_planted",  # 300 s
    "test_train",  # 230 s
    "test_generation_openai",  # 190 s: one `vllm serve` start, then its tests
    "test_generic",  # 140 s
    "test_cf_models",  # 160 s
    "test_prepare_cluster",  # 150 s: a two-node cluster
    "test_s3",  # 130 s
    "test_generation_vllm",  # 110 s: one vLLM engine start
    "test_keywords",  # 105 s
    "test_no_orphans",  # 100 s
    "test_scoring_hf",  # 100 s
    "test_explain",  # 90 s
    "test_scoring_vllm",  # 75 s
)


def _group(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return SHARED_GROUP.get(module, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Work units of whole modules (or shared groups), handed out in collection order."""
    if config.getvalue("dist") not in ("load", "loadscope", "loadfile", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False  # keep LONGEST_FIRST's order, not the units' test counts
    return ModuleGroups(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # only xdist's workers: a serial run keeps the file order
        return
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine run several times faster on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs for the whole session."""
    import ray

    if not ray.is_initialized():
        start_local_ray(2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    size_local_shuffles(2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> str:
    """A tiny Qwen2-style model (2 layers, hidden 128, head_dim 64) with the real Qwen vocabulary."""
    from thinkrec.model.base import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen")), C.Config().model.tiny, kind="qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny Llama-style model: BOS token and a Llama-3-style chat template."""
    from thinkrec.model.base import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")), C.Config().model.tiny, kind="llama")


def small_config(root: str, **overrides) -> C.Config:
    """The demo config shrunk for tests: 40 users, few samples, 2 shards."""
    base = {
        "storage.output_root": root,
        "storage.num_shards": 2,
        "ray.num_cpus": 2,
        "data.max_users": 40,
        "cf.epochs": 3,
        "cf.baselines": [],  # the demo's LightGCN and SASRec baselines: tests/test_cf_models.py
        "model.warmup_steps": 0,  # the demo's warm-up of the tiny model: tests/test_warmup.py
        "train.max_train_samples": 64,
        "train.max_valid_samples": 32,
        "train.epochs": 1,  # the demo trains stage 1 for 2
        "train.projector_epochs": 1,  # and stage 2 for 2
        "train.warmup_steps": 2,
        "train.n_groups": 2,
        "train.expert_last_layers": 1,
        "train.checkpoint_every": 4,
        "explain.n_samples": 2,
        "explain.max_new_tokens": 8,
        "explain.temperature": 0.4,  # the reference setting (the demo samples at 0.7)
    }
    base.update(overrides)
    return C.load("configs/demo.yaml", base)


@pytest.fixture(scope="session")
def prepared(ray_local, tmp_path_factory) -> C.Config:
    """prepare run once on 40 users; other stages' tests start from here."""
    from thinkrec.data import prepare

    cfg = small_config(str(tmp_path_factory.mktemp("run")))
    prepare.run(cfg)
    return cfg


@pytest.fixture(scope="session")
def pipeline_run(prepared, tmp_path_factory):
    """The whole pipeline once, in a fresh root that starts from the session's prepared tables
    (prepare is tested on its own): test_pipeline checks it, the ablation test starts from it."""
    import shutil

    from thinkrec import pipeline

    root = str(tmp_path_factory.mktemp("pipeline"))
    shutil.copytree(os.path.join(prepared.storage.output_root, "prepare"), os.path.join(root, "prepare"))
    cfg = prepared.replace(**{"storage.output_root": root})
    return cfg, pipeline.run(cfg)


# -- scoring: random model artifacts and one scored run, shared by the score-stage and S3 tests -------
ML100K_ITEMS = 1682


@pytest.fixture(scope="session")
def artifact_dirs(prepared, tiny_qwen, tmp_path_factory) -> str:
    """Random model artifacts (cf/model, train/) built once and copied into each test's root."""
    from artifacts import make_artifacts

    root = str(tmp_path_factory.mktemp("score-artifacts"))
    make_artifacts(
        small_config(root, **{"model.base": tiny_qwen}),
        tiny_qwen,
        n_users=40,
        n_items=ML100K_ITEMS,
        n_experts=3,
    )
    return root


def scoring_root(prepared, tiny_qwen, artifact_root: str, root: str, **overrides) -> C.Config:
    """A copy of the prepared run plus the shared random model artifacts, under ``root``."""
    import shutil

    from thinkrec.io.fs import Storage

    storage = Storage.from_config(prepared)
    shutil.copytree(storage.local_path(storage.uri("prepare")), os.path.join(root, "prepare"))
    for d in ("cf", "train"):
        shutil.copytree(os.path.join(artifact_root, d), os.path.join(root, d))
    return small_config(
        root,
        **{"model.base": tiny_qwen, "score.batch_size": 16, "score.torch_threads": 1, **overrides},
    )


@pytest.fixture(scope="session")
def scored(prepared, tiny_qwen, artifact_dirs, tmp_path_factory):
    """The hf score stage run once on the test split: (config, manifest, scores table)."""
    from thinkrec.io.commit import read_table
    from thinkrec.io.fs import Storage
    from thinkrec.scoring import stage

    cfg = scoring_root(prepared, tiny_qwen, artifact_dirs, str(tmp_path_factory.mktemp("score")))
    manifest = stage.run(cfg)
    storage = Storage.from_config(cfg)
    return cfg, manifest, read_table(storage, storage.uri(stage.SCORES))


# -- S3: a real moto server on 127.0.0.1, shared by the tests that need one bucket each ---------------
@pytest.fixture(scope="session")
def moto_server():
    """Endpoint URL of moto's server mode on 127.0.0.1 (any credentials are accepted)."""
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh bucket on the moto server, the AWS chain pointed at it through the environment only:
    {endpoint, bucket, client, storage (rooted at s3://bucket/run), env (the AWS_* variables, for
    subprocesses and submitted jobs)}."""
    import uuid

    import boto3
    from servers import aws_env

    from thinkrec.io.fs import Storage

    env = aws_env(moto_server, "testing", "testing")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    bucket = f"thinkrec-{uuid.uuid4().hex[:10]}"
    client = boto3.session.Session().client("s3", endpoint_url=moto_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    storage = Storage(root=f"s3://{bucket}/run", s3_endpoint=moto_server)
    return {"endpoint": moto_server, "bucket": bucket, "client": client, "storage": storage, "env": env}


@pytest.fixture(scope="session")
def vllm_serve(tiny_qwen, tmp_path_factory):
    """One real ``vllm serve`` of the tiny model on 127.0.0.1 for the whole session (3-4 min to start
    on a CPU), requiring generation_servers.PLANTED_KEY. Its log is checked for the key."""
    from generation_servers import VLLMServer

    server = VLLMServer(tiny_qwen, str(tmp_path_factory.mktemp("vllm-serve") / "serve.log"))
    try:
        server.start()
        yield server
    finally:
        server.stop()

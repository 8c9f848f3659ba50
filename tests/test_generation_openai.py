"""The ``openai`` generation backend against a real ``vllm serve`` of the tiny model on 127.0.0.1
(one server for the session), a fault-injecting proxy in front of it, and crafted malformed bodies."""

from __future__ import annotations

import logging
import os
import threading
import time

import pandas as pd
import pytest
from conftest import small_config
from generation_servers import PLANTED_KEY, SERVED_NAME, CraftedServer, FaultProxy

from thinkrec.data import schema as S
from thinkrec.generation.base import Decoding, GenRequest
from thinkrec.generation.openai import OpenAIGenerator

KEY_ENV = "THINKREC_TEST_GEN_KEY"
DEC = Decoding(max_new_tokens=8, temperature=0.0)


def gen_config(url: str, tmp_path, **over):
    return small_config(
        str(tmp_path),
        **{
            "generation.backend": "openai",
            "generation.base_url": url,
            "generation.model": SERVED_NAME,
            "generation.api_key_env": KEY_ENV,
            "generation.backoff_initial_s": 0.05,
            "generation.backoff_max_s": 0.5,
            **over,
        },
    )


def requests(n: int) -> list[GenRequest]:
    return [GenRequest(f"r{i}", f"User {i} liked movie {i % 7}. Next they watch") for i in range(n)]


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)


@pytest.fixture(scope="module")
def direct(vllm_serve, tmp_path_factory):
    """Texts of 24 prompts straight from the server (no faults): what every faulty run must match."""
    os.environ[KEY_ENV] = PLANTED_KEY
    try:
        gen = OpenAIGenerator(gen_config(vllm_serve.url, tmp_path_factory.mktemp("d")))
        res = gen.generate(requests(24), DEC)
    finally:
        del os.environ[KEY_ENV]
    assert all(r.error is None for r in res), [r.error for r in res if r.error]
    return {r.key: r.text for r in res}


def test_generates_with_key_and_quarantines_without(vllm_serve, direct, tmp_path, monkeypatch):
    assert len(direct) == 24 and all(isinstance(t, str) for t in direct.values())
    assert sum(bool(t) for t in direct.values()) >= 20  # 8 greedy tokens of a random model: mostly non-empty
    monkeypatch.delenv(KEY_ENV, raising=False)
    res = OpenAIGenerator(gen_config(vllm_serve.url, tmp_path)).generate(requests(3), DEC)
    # 401 is not retried: one try each, quarantined with the status
    assert [(r.text, r.error.split(":")[0], r.tries) for r in res] == [(None, "http_401", 1)] * 3


def test_faulty_proxy_stage_finishes_and_accounts(vllm_serve, direct, tmp_path, key_env):
    proxy = FaultProxy(vllm_serve.port, p500=0.15, preset=0.1, pstall=0.05, stall_s=4.0, seed=3)
    proxy.start()
    try:
        cfg = gen_config(proxy.url, tmp_path, **{"generation.timeout_s": 1.5, "generation.max_tries": 8})
        gen = OpenAIGenerator(cfg)
        res = gen.generate(requests(24), DEC)
    finally:
        proxy.close()
    assert proxy.counts["500"] > 0 and proxy.counts["reset"] > 0 and proxy.counts["stall"] > 0
    ok = [r for r in res if r.error is None]
    failed = [r for r in res if r.error is not None]
    # Every injected fault cost exactly one try; every row either made it or is quarantined.
    assert gen.stats["requests"] == proxy.counts["forwarded"] + proxy.faults
    assert proxy.counts["forwarded"] == len(ok)
    assert sum(r.tries for r in res) == gen.stats["requests"]
    assert len(ok) + len(failed) == 24 and [r.key for r in res] == [f"r{i}" for i in range(24)]
    assert {r.key: r.text for r in ok} == {k: direct[k] for k in (r.key for r in ok)}
    assert all(r.tries == 8 for r in failed)


def test_proxy_stopped_mid_run_and_restarted(vllm_serve, direct, tmp_path, key_env):
    """The endpoint goes away mid-run (listener closed, open connections dropped) and comes back on the
    same port: refused/reset requests are retried; no row lost, none duplicated."""
    proxy = FaultProxy(vllm_serve.port)
    proxy.start()

    def outage() -> None:
        time.sleep(0.3)
        proxy.stop()
        time.sleep(2.0)
        proxy.start()

    t = threading.Thread(target=outage)
    try:
        cfg = gen_config(
            proxy.url, tmp_path,
            **{"generation.max_tries": 10, "generation.backoff_initial_s": 0.2, "generation.backoff_max_s": 1.0,
               "generation.concurrency": 2},
        )  # fmt: skip
        gen = OpenAIGenerator(cfg)
        t.start()
        res = gen.generate(requests(24), DEC)
        t.join()
    finally:
        proxy.close()
    assert gen.stats["retries"] > 0
    assert [r.key for r in res] == [f"r{i}" for i in range(24)]
    assert all(r.error is None for r in res), [r.error for r in res if r.error]
    assert {r.key: r.text for r in res} == direct
    assert proxy.counts["forwarded"] == 24  # each row reached the server exactly once


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("not_json", "malformed_response: not JSON"),
        ("no_choices", "malformed_response: no choices[0]"),
        ("text_not_string", "malformed_response: choices[0].text is not a string"),
        ("bad_request", "http_400"),
    ],
)
def test_malformed_responses_quarantined(kind, reason, tmp_path):
    srv = CraftedServer()
    try:
        gen = OpenAIGenerator(gen_config(srv.url, tmp_path))
        res = gen.generate([GenRequest("a", kind), GenRequest("b", "ok")], DEC)
    finally:
        srv.close()
    assert res[0].text is None and res[0].error.startswith(reason) and res[0].tries == 1
    assert (res[1].text, res[1].error) == (" fine", None)
    assert srv.hits == {kind: 1, "ok": 1}  # not retried


def test_key_never_printed(vllm_serve, direct, ray_local, tmp_path, key_env, caplog, capfd):
    """Through the Ray Data stage: the key reaches the server (rows succeed) but not the logs, the
    actor's runtime_env, the generator's repr or the output rows."""
    import ray

    from thinkrec.generation.stage import generate

    caplog.set_level(logging.DEBUG)
    cfg = gen_config(vllm_serve.url, tmp_path, **{"generation.batch_size": 4})
    rows = pd.DataFrame({S.ROW_KEY: [r.key for r in requests(8)], S.PROMPT: [r.prompt for r in requests(8)]})
    out = generate(ray.data.from_pandas(rows), cfg, DEC).to_pandas().sort_values(S.ROW_KEY)
    assert out[S.GEN_ERROR].isna().all()
    assert dict(zip(out[S.ROW_KEY], out[S.GENERATED], strict=True)) == {k: direct[k] for k in out[S.ROW_KEY]}
    assert set(out[S.BACKEND]) == {"openai"} and set(out[S.GEN_MODEL]) == {SERVED_NAME}
    assert set(out[S.DECODING_HASH]) == {DEC.hash()}

    @ray.remote
    def runtime_env() -> str:
        return str(ray.get_runtime_context().runtime_env)

    seen = [caplog.text, *capfd.readouterr(), ray.get(runtime_env.remote()), str(cfg), out.to_csv()]
    seen.append(repr(OpenAIGenerator(cfg)))
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    for root, _, files in os.walk(logs):
        for f in files:
            with open(os.path.join(root, f), errors="replace") as fh:
                seen.append(fh.read())
    assert len(seen) > 8
    assert not [s[:80] for s in seen if PLANTED_KEY in s]

"""The Ray Serve deployment (``serve --ray``): a local Ray cluster (2 CPUs), the same app as the Serve ingress, 2 CPU
replicas, tiny FLUX and SD 1.5 at 64x64, driven over HTTP with the one-machine server's client helpers.

Skipped where Ray is not installed (an optional extra: ``pip install 'aitk-inference[ray]'``); the check that the
one-machine server never imports Ray runs everywhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from test_server import FINISHED, LONG_STEPS, submit, wait_for, wait_for_step

REPLICA_PREFIX = "aitk-replica"
LONG_PROMPTS = 20  # a tiny 150-step prompt can take under a second: long jobs (always canceled or killed) have many
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")  # Ray's own pydantic v1-style fields


def test_one_machine_server_never_imports_ray():
    code = ("import sys, aitk_inference.cli, aitk_inference.server.main; "
            "aitk_inference.cli.build_parser().parse_args(['serve']); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())


def test_ray_only_options_need_ray():
    from aitk_inference.server.main import serve

    with pytest.raises(ValueError, match="add --ray"):
        serve(replicas=2)


# ---------------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_dirs(tmp_path_factory, tiny_dir):
    from types import SimpleNamespace

    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from aitk_inference.tiny.loras import kohya_targets, lora_targets, write_kohya_lora, write_lora

    root = tmp_path_factory.mktemp("ray_server")
    workflows, outputs = root / "workflows", root / "outputs"
    workflows.mkdir(), outputs.mkdir()
    # the LoRAs need only the denoisers' module names and shapes (the pipelines are loaded by the replicas)
    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir("flux"), subfolder="transformer")
    for i, name in enumerate(("style_a", "style_b")):
        write_lora(str(workflows / f"{name}.safetensors"), "peft", lora_targets(transformer), seed=i)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir("sd15"), subfolder="unet")
    write_kohya_lora(str(workflows / "sd15_a.safetensors"), kohya_targets(SimpleNamespace(unet=unet)))
    return {"workflows": str(workflows), "outputs": str(outputs)}


@pytest.fixture(scope="module")
def ray():
    return pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'aitk-inference[ray]'); "
                                             "the Ray Serve tests need it")


@pytest.fixture(scope="module")
def ray_server(ray, ray_dirs, tiny_dir):  # ``ray`` first: no tiny model is loaded where the tests skip
    from ray import serve

    from aitk_inference.server.ray_serve import build_app
    from aitk_inference.server.settings import Settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"WORKFLOWS_BASE_PATH": ray_dirs["workflows"], "OUTPUT_BASE_PATH": ray_dirs["outputs"], "DEVICE": "cpu"}
    settings = Settings.from_env(env, host="127.0.0.1", port=port,
                                 bases=[f"flux={tiny_dir('flux')}", f"sd15={tiny_dir('sd15')}"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a cluster found running
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings, replicas=2, options={"num_cpus": 1}, name_prefix=REPLICA_PREFIX),
                  name="aitk", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
        serve.shutdown()
    finally:
        ray.shutdown()


def submit_long(client: httpx.Client) -> str:
    prompt = {"prompt": "a photo of [trigger]", "width": 64, "height": 64, "sample_steps": LONG_STEPS, "seed": 7}
    return submit(client, prompts=[prompt] * LONG_PROMPTS)["request_id"]


def replica_of(result: dict) -> str:
    return result["metadata"]["replica"]


def run_to_end(client: httpx.Client, **kwargs) -> dict:
    request_id = submit(client, **kwargs)["request_id"]
    assert wait_for(client, request_id)["status"] == "succeeded"
    return client.get(f"/v1/requests/{request_id}/result").json()


def running_replica(request_id: str):
    """The replica actor running ``request_id`` (asked through Ray, as an operator would)."""
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(REPLICA_PREFIX):
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            try:
                if ray.get(actor.progress.remote(request_id), timeout=10) is not None:
                    return entry["name"], actor
            except ray.exceptions.RayActorError:
                continue  # a killed one, not yet unregistered
    raise AssertionError(f"no replica runs {request_id}")


# ---------------------------------------------------------------------------------------------------------------- tests
def test_affinity_cancel_running_and_results(ray_server):
    client = ray_server
    # a fresh cluster: flux lands on the first replica, sd15 on the empty one, then each returns to its replica
    first_flux = run_to_end(client)
    first_sd15 = run_to_end(client, model="sd15", lora="sd15_a.safetensors")
    assert replica_of(first_flux) != replica_of(first_sd15)
    assert not first_flux["metadata"]["timings"]["pipeline_details"]["cache_hit"]
    for kwargs, first in (({"lora": "style_b.safetensors"}, first_flux),
                          ({"model": "sd15", "lora": "sd15_a.safetensors"}, first_sd15)):
        again = run_to_end(client, **kwargs)
        assert replica_of(again) == replica_of(first), kwargs
        assert again["metadata"]["timings"]["pipeline_details"]["cache_hit"]
    # results come through the one-machine routes
    image = client.get(f"/v1/requests/{first_flux['request_id']}/outputs/0")
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    listed = client.get("/v1/requests", params={"status": "succeeded"}).json()
    assert listed["total"] == 4

    # flux's replica is busy: the next flux job goes to the other (free) replica, which loads it
    long = submit_long(client)
    running = wait_for_step(client, long)
    assert running["total_steps"] == LONG_STEPS * LONG_PROMPTS and running["attempts"] == 1
    assert running_replica(long)[0] == replica_of(first_flux)
    other = run_to_end(client)
    assert replica_of(other) == replica_of(first_sd15)
    assert not other["metadata"]["timings"]["pipeline_details"]["cache_hit"]

    canceled = client.post(f"/v1/requests/{long}/cancel")
    assert canceled.status_code == 200, canceled.text
    final = wait_for(client, long)
    assert final["status"] == "canceled" and final["step"] is None
    assert client.post(f"/v1/requests/{long}/cancel").status_code == 409


def test_cancel_queued_job_and_queue_positions(ray_server):
    client = ray_server
    busy = [submit_long(client) for _ in range(2)]
    for request_id in busy:
        wait_for_step(client, request_id)
    queued = submit(client)
    assert queued["queue_position"] == 1
    assert client.get(f"/v1/requests/{queued['request_id']}/status").json()["queue_position"] == 1
    response = client.post(f"/v1/requests/{queued['request_id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    for request_id in busy:
        assert client.post(f"/v1/requests/{request_id}/cancel").status_code == 200
        assert wait_for(client, request_id)["status"] == "canceled"


def wait_for_retry(client: httpx.Client, request_id: str, timeout=60.0) -> dict:
    """The status once the request runs again (second attempt, at step 1 or later)."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/v1/requests/{request_id}/status").json()
        if status["attempts"] == 2 and status["status"] == "in_progress" and (status["step"] or 0) >= 1:
            return status
        assert status["status"] not in FINISHED and time.monotonic() < deadline, status
        time.sleep(0.02)


def test_killed_replica_retries_once_then_fails_with_a_reason(ray_server, ray):
    client = ray_server
    request_id = submit_long(client)
    wait_for_step(client, request_id)
    first_name, first = running_replica(request_id)
    ray.kill(first, no_restart=True)

    wait_for_retry(client, request_id)  # queued again, running on the other replica
    second_name, second = running_replica(request_id)
    assert second_name.rsplit(".", 1)[0] != first_name.rsplit(".", 1)[0]
    ray.kill(second, no_restart=True)

    failed = wait_for(client, request_id)
    assert failed["status"] == "failed" and "died, twice" in failed["error"], failed
    # both replicas were replaced: the cluster still runs jobs
    assert run_to_end(client)["status"] == "succeeded"
    assert all(status in FINISHED for status in
               (r["status"] for r in client.get("/v1/requests", params={"limit": 50}).json()["requests"]))


def test_serve_config_builder_and_replica_count_are_checked(ray_server):
    from aitk_inference.server.ray_serve import app_builder, check_fits

    with pytest.raises(ValueError, match="only one is 'replicas'"):
        app_builder({"num_replicas": 2})
    with pytest.raises(ValueError, match="lower --replicas"):
        check_fits(3, {"num_cpus": 1})  # the test cluster has 2 CPUs
    with pytest.raises(ValueError, match="GPU"):
        check_fits(1, {"num_gpus": 1})


def test_routing_prefers_same_loras_then_model_then_fewest_pipelines(ray, tmp_path):
    from aitk_inference.server.mapping import Job, LoraSource
    from aitk_inference.server.ray_serve import RayDispatcher, lora_key
    from aitk_inference.server.settings import Settings
    from aitk_inference.server.store import TaskStore

    def job(model: str, lora: str, task_id: str = "t") -> Job:
        return Job(id=task_id, model=model, loras=[LoraSource(strength=1.0, side=None, path=lora)], prompts=[],
                   controls=[], output_format="png", hf_token=None, total_steps=1)

    settings = Settings.from_env({"OUTPUT_BASE_PATH": str(tmp_path)})
    dispatcher = RayDispatcher(settings, TaskStore(settings.database_path), None, replicas=3, replica_options={})
    empty, flux_a, flux_b = dispatcher._slots
    flux_a.held, flux_a.loras = ["flux"], {"flux": lora_key(job("flux", "a"))}
    flux_b.held, flux_b.loras = ["flux", "sd15"], {"flux": lora_key(job("flux", "b"))}
    assert dispatcher._choose(job("flux", "b")) is flux_b  # same LoRAs applied
    assert dispatcher._choose(job("flux", "c")) is flux_a  # holds the model; fewer pipelines than flux_b
    assert dispatcher._choose(job("sd15", "a")) is flux_b
    assert dispatcher._choose(job("sd3", "a")) is empty  # holds the fewest pipelines
    dispatcher._died_once["again"] = flux_b.index  # a retry avoids the slot its replica died on
    assert dispatcher._choose(job("flux", "b", task_id="again")) is flux_a
    flux_a.job = empty.job = job("flux", "busy")  # ...unless it is the only free one
    assert dispatcher._choose(job("flux", "b", task_id="again")) is flux_b
    with pytest.raises(ValueError, match="at least one replica"):
        RayDispatcher(settings, dispatcher.store, None, replicas=0, replica_options={})

"""The online endpoint as a client sees it: a real Ray Serve app on the shared local Ray, real HTTP on loopback,
models from a real (temporary) MLflow registry. One app serves the module; its answers are compared with the
same models run offline in this process."""
import base64
import io
import json
import re
import threading
import time
from urllib.parse import urljoin

import mlflow
import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from PIL import Image

from equiray import create_model
from equiray.config import load_config
from equiray_pipelines import tracking
from equiray_pipelines.serve import ServeConfig, deploy, deployment_options

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # Ray + Serve start: 20-50 s here

CLASSES = [f"class-{i}" for i in range(10)]
SIZE = 14  # the models' input size; clients send 28x28 images, the endpoint resizes them (area averaging)


def ensemble_spec(members: int) -> dict:
    return {"name": "ensemble", "in_chans": 1, "num_classes": 10, "input_shape": [1, SIZE, SIZE], "group": "C4",
            "kwargs": {"member": "small_cnn", "member_kwargs": {"width": 4}, "num_members": members},
            "classes": CLASSES}


def build(spec: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(spec["name"], in_chans=spec["in_chans"], num_classes=spec["num_classes"],
                        **spec["kwargs"]).eval()


def register(model, spec, name: str, *, metrics: dict, tags: dict | None = None) -> str:
    with mlflow.start_run():
        mlflow.log_metrics(metrics)
        uri = tracking.log_model(model, spec, name="model")
    return tracking.register(uri, name, "champion", tags=tags)


def images(n: int, seed: int) -> np.ndarray:
    """``n`` 28x28 uint8 images with structure (a bright bar at a random place) on noise."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i in range(n):
        r, c = rng.integers(2, 18, size=2)
        x[i, r:r + 8, c:c + 3] = 230
    return x


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def offline(model, imgs: np.ndarray):
    """The model run here on the same pixels: uint8 -> [0, 1] -> area-resized to the input size."""
    x = torch.from_numpy(imgs).float().div(255)[:, None]  # (B, 1, 28, 28)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="area")  # (B, 1, 14, 14)
    with torch.no_grad():
        return model(x).softmax(-1), x


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.setup("test-serve", uri)
    spec = ensemble_spec(3)
    ens = build(spec, seed=0)
    register(ens, spec, "t-ensemble", metrics={"test_accuracy": 0.625, "osp": 3.5})
    cfg = load_config(ServeConfig, {"model": "models:/t-ensemble@champion", "port": 0,
                                    "batch": {"max_batch_size": 8, "wait_timeout_s": 0.01}})
    ep = deploy(cfg)
    yield {"url": ep["url"], "cfg": cfg, "ensemble": ens, "spec": spec, "tracking_uri": uri, "port": ep["port"],
           "ep": ep}
    serve.shutdown()
    mp.undo()


def post(url: str, **kw) -> requests.Response:
    return requests.post(url + "/v1/predict", timeout=60, **kw)


def check_against(model, imgs, predictions, *, ensemble: bool):
    probs, x = offline(model, imgs)
    assert len(predictions) == len(imgs)
    for i, p in enumerate(predictions):
        got = torch.tensor([p["probabilities"][c] for c in CLASSES])
        assert torch.allclose(got, probs[i], atol=1e-5), (i, got, probs[i])
        assert p["class_index"] == int(probs[i].argmax()) and p["label"] == CLASSES[p["class_index"]]
    if ensemble:
        with torch.no_grad():
            votes = model.member_logits(x).argmax(-1)  # (N, B)
        expected = (votes != probs.argmax(-1)).float().mean(0)
        assert [p["disagreement"] for p in predictions] == pytest.approx(expected.tolist())


# ------------------------------------------------------------------------------------------------ answers
def test_png_body_matches_the_offline_model(served):
    imgs = images(1, seed=1)
    res = post(served["url"], data=png(imgs[0]), headers={"Content-Type": "image/png"})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["model"] == "t-ensemble" and body["version"] == "1"
    check_against(served["ensemble"], imgs, body["predictions"], ensemble=True)


def test_the_replica_answers_on_its_own_port_and_through_the_proxy_alike(served):
    ep = served["ep"]
    assert ep["ingress"] == "direct" and ep["replica_urls"] == [ep["url"]] and ep["url"] != ep["proxy_url"]
    imgs = images(1, seed=11)
    answers = [post(u, data=png(imgs[0]), headers={"Content-Type": "image/png"}) for u in (ep["url"], ep["proxy_url"])]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert answers[0].json() == answers[1].json()
    check_against(served["ensemble"], imgs, answers[0].json()["predictions"], ensemble=True)


def test_multipart_files_and_jpeg(served):
    imgs = images(3, seed=2)
    files = [("files", (f"img{i}.png", png(im), "image/png")) for i, im in enumerate(imgs)]
    res = post(served["url"], files=files)
    assert res.status_code == 200, res.text
    check_against(served["ensemble"], imgs, res.json()["predictions"], ensemble=True)
    buf = io.BytesIO()
    Image.fromarray(imgs[0]).convert("RGB").save(buf, "JPEG", quality=95)  # colour JPEG -> grey for this model
    res = post(served["url"], data=buf.getvalue(), headers={"Content-Type": "image/jpeg"})
    assert res.status_code == 200 and len(res.json()["predictions"]) == 1


def test_json_instances_pixel_arrays_and_b64(served):
    imgs = images(4, seed=3)
    arrays = (imgs.astype(np.float64) / 255).tolist()
    chw = [a[None].tolist() for a in imgs.astype(np.float64) / 255]  # (1, H, W) is accepted too
    res = post(served["url"], json={"instances": arrays[:2] + chw[2:]})
    assert res.status_code == 200, res.text
    check_against(served["ensemble"], imgs, res.json()["predictions"], ensemble=True)
    res = post(served["url"], json={"instances": [{"b64": base64.b64encode(png(imgs[0])).decode()}]})
    assert res.status_code == 200, res.text
    check_against(served["ensemble"], imgs[:1], res.json()["predictions"], ensemble=True)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served):
    imgs = images(16, seed=4)
    results = [None] * len(imgs)

    def one(i):
        results[i] = post(served["url"], data=png(imgs[i]), headers={"Content-Type": "image/png"})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(imgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    check_against(served["ensemble"], imgs, [r.json()["predictions"][0] for r in results], ensemble=True)


def test_model_info_health_and_docs(served):
    url = served["url"]
    info = requests.get(url + "/v1/model", timeout=30).json()
    assert (info["name"], info["version"], info["alias"], info["kind"]) == ("t-ensemble", "1", "champion", "ensemble")
    assert info["metrics"] == {"test_accuracy": 0.625, "osp": 3.5}  # what the registering run logged
    assert info["members"] == 3 and info["input_shape"] == [1, SIZE, SIZE] and info["classes"] == CLASSES
    assert info["batching"] == {"enabled": True, "max_batch_size": 8, "wait_timeout_s": 0.01}
    health = requests.get(url + "/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    schema = requests.get(url + "/openapi.json", timeout=30).json()
    assert {"/v1/predict", "/v1/model", "/healthz"} <= set(schema["paths"])
    content = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"image/png", "image/jpeg", "multipart/form-data", "application/json"} <= set(content)
    for page, script in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = requests.get(url + page, timeout=30)
        assert html.status_code == 200 and script in html.text
        # offline: nothing the page loads comes from another host (Swagger UI and ReDoc are served from here)
        assert re.findall(r"(?:src|href)=[\"'](https?:|//)", html.text) == [], html.text
        assets = re.findall(r"(?:src|href)=[\"']([^\"']+)", html.text)
        assert any(a.endswith(script) for a in assets), assets
        for asset in assets:
            got = requests.get(urljoin(url + "/", asset), timeout=30)
            assert got.status_code == 200 and len(got.content) > 1000, asset


# ------------------------------------------------------------------------------------------------ bad input
def _big_png() -> bytes:
    return png(np.zeros((10, 1100), dtype=np.uint8))  # small file, but 1100 px wide: over max_side


BAD = {
    "wrong content type": (dict(data=b"hello", headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
    "no content type": (dict(data=b"\x89PNG"), 415, "Content-Type"),
    "non-image bytes": (dict(data=b"this is not an image" * 10, headers={"Content-Type": "image/png"}), 400,
                        "not a PNG or JPEG"),
    "truncated png": (dict(data=png(images(1, 5)[0])[:80], headers={"Content-Type": "image/png"}), 400,
                      "truncated"),
    "empty body": (dict(data=b"", headers={"Content-Type": "image/png"}), 400, "empty"),
    "image too large": (dict(data=_big_png(), headers={"Content-Type": "image/png"}), 400, "1100"),
    "not json": (dict(data=b"{instances: ", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
    "json without instances": (dict(json={"inputs": [1]}), 400, "instances"),
    "empty batch": (dict(json={"instances": []}), 400, "empty"),
    "wrong shape": (dict(json={"instances": [[1.0, 0.5, 0.2]]}), 400, "shape (3,)"),
    "wrong channel count": (dict(json={"instances": [np.zeros((3, 8, 8)).tolist()]}), 400, "shape (3, 8, 8)"),
    "ragged array": (dict(json={"instances": [[[0.1, 0.2], [0.3]]]}), 400, "rectangular"),
    "nan": (dict(data=b'{"instances": [[[0.1, NaN], [0.2, 0.3]]]}', headers={"Content-Type": "application/json"}),
            400, "NaN or infinite"),
    "inf": (dict(data=b'{"instances": [[[0.1, Infinity], [0.2, 0.3]]]}',
                 headers={"Content-Type": "application/json"}), 400, "NaN or infinite"),
    "0-255 values": (dict(json={"instances": [[[0.0, 255.0], [12.0, 3.0]]]}), 400, "divide"),
    "strings": (dict(json={"instances": [[["a", "b"], ["c", "d"]]]}), 400, "numbers"),
    "bad b64": (dict(json={"instances": [{"b64": "***"}]}), 400, "base64"),
    "empty multipart": (dict(data=b"--xx--\r\n", headers={"Content-Type": "multipart/form-data; boundary=xx"}), 400,
                        "no image"),
    "multipart without boundary": (dict(data=b"abc", headers={"Content-Type": "multipart/form-data"}), 400,
                                   "multipart"),
    "oversized payload": (dict(data=b"\0" * (8 * 2**20 + 1), headers={"Content-Type": "image/png"}), 413,
                          "at most"),
    "too many images": (dict(json={"instances": [[[0.5]]] * 65}), 413, "at most 64"),
    # 16 MB: answered with a 413, not a connection reset (the body is drained before the answer)
    "16 MB json": (dict(data=b'{"instances": [[' + b"0.5," * (4 * 2**20) + b'0.5]]}',
                        headers={"Content-Type": "application/json"}), 413, "at most"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_json_error_that_says_what_was_wrong(served, case):
    kwargs, status, words = BAD[case]
    res = post(served["url"], **kwargs)
    assert res.status_code == status, (case, res.status_code, res.text)
    error = res.json()["error"]
    assert words.lower() in error["message"].lower(), error
    assert error["code"]


def test_replica_survives_bad_input(served):
    for kwargs, _, _ in BAD.values():
        post(served["url"], **kwargs)
    res = post(served["url"], data=png(images(1, 6)[0]), headers={"Content-Type": "image/png"})
    assert res.status_code == 200
    from ray import serve

    app = serve.status().applications[served["cfg"].app_name]
    replicas = app.deployments["EquirayModel"].replica_states
    assert replicas.get("RUNNING") == 1 and sum(replicas.values()) == 1  # the same replica, never restarted


# ------------------------------------------------------------------------------------------------ swapping
def test_promoting_a_new_version_swaps_it_without_dropping_requests(served):
    url, spec = served["url"], served["spec"]
    imgs = images(4, seed=7)
    payload = {"instances": (imgs.astype(np.float64) / 255).tolist()}
    seen, errors, stop = [], [], threading.Event()

    def client():
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(url + "/v1/predict", json=payload, timeout=60)
                    if r.status_code != 200:
                        errors.append((r.status_code, r.text[:200]))
                    else:
                        seen.append((time.monotonic(), r.json()))
                except requests.RequestException as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        v2 = build(spec, seed=1)
        register(v2, spec, "t-ensemble", metrics={"test_accuracy": 0.75})  # version 2 -> @champion
        deploy(served["cfg"])  # the same command again: the alias now names version 2
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(a["version"] == "2" for _, a in seen[-20:]):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    versions = [a["version"] for _, a in seen]
    assert versions[0] == "1" and versions[-1] == "2", versions
    assert versions.count("1") > 5 and versions.count("2") > 5  # requests flowed before and after the swap
    first_v2 = versions.index("2")
    assert set(versions[first_v2:]) == {"2"}  # once swapped, no replica answers with the old version
    check_against(v2, imgs, seen[-1][1]["predictions"], ensemble=True)
    info = requests.get(url + "/v1/model", timeout=30).json()
    assert info["version"] == "2" and info["metrics"] == {"test_accuracy": 0.75}


def test_a_calibrated_version_answers_with_its_temperature_and_abstains_below_min_confidence(served):
    from ray import serve

    spec = {"name": "small_cnn", "in_chans": 1, "num_classes": 10, "input_shape": [1, SIZE, SIZE],
            "classes": CLASSES, "kwargs": {"width": 4}}
    model = build(spec, seed=5)
    register(model, spec, "t-calibrated", metrics={"upright_accuracy": 0.5},
             tags={tracking.TEMPERATURE_TAG: "2.5"})
    imgs = images(16, seed=12)
    _, x = offline(model, imgs)
    with torch.no_grad():
        expected = (model(x) / 2.5).softmax(-1)  # not softmax(logits): the registered temperature applies
    floor = float(expected.max(-1).values.median())  # half of this batch falls below it
    cfg = load_config(ServeConfig, {"model": "models:/t-calibrated@champion", "app_name": "cal",
                                    "route_prefix": "/cal", "min_confidence": floor, "batch": {"enabled": False}})
    ep = deploy(cfg)
    try:
        res = post(ep["url"], files=[("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(imgs)])
        assert res.status_code == 200, res.text
        preds = res.json()["predictions"]
        for p, e in zip(preds, expected):
            got = torch.tensor([p["probabilities"][c] for c in CLASSES])
            assert torch.allclose(got, e, atol=1e-5) and p["confidence"] == pytest.approx(float(e.max()), abs=1e-5)
            assert p["class_index"] == int(e.argmax())
        assert [p["abstain"] for p in preds] == (expected.max(-1).values < floor).tolist()
        assert {p["abstain"] for p in preds} == {True, False}
        info = requests.get(ep["url"] + "/v1/model", timeout=30).json()
        assert info["temperature"] == 2.5 and info["min_confidence"] == pytest.approx(floor)
    finally:
        serve.delete("cal")
    # an uncalibrated version (no tag) keeps temperature 1 and never abstains at the default min_confidence 0
    plain = post(served["url"], data=png(imgs[0]), headers={"Content-Type": "image/png"}).json()["predictions"][0]
    assert plain["abstain"] is False
    assert requests.get(served["url"] + "/v1/model", timeout=30).json()["temperature"] == 1.0


# ------------------------------------------------------------------------------------------------ canonicalizer
def test_canonicalized_model_reports_the_chosen_group_element(served):
    from ray import serve

    spec = {"name": "canonicalized", "in_chans": 1, "num_classes": 10, "input_shape": [1, SIZE, SIZE],
            "classes": CLASSES, "kwargs": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4},
                                           "canonicalizer": "equivariant", "canonicalizer_kwargs": {"channels": 4},
                                           "group": "C4"}}
    model = build(spec, seed=3)
    register(model, spec, "t-canon", metrics={"upright_accuracy": 0.5})
    cfg = load_config(ServeConfig, {"model": "models:/t-canon@champion", "app_name": "canon",
                                    "route_prefix": "/canon", "batch": {"enabled": False}})
    ep = deploy(cfg)  # a second app beside the first, on the same proxy
    try:
        assert ep["proxy_url"] == served["ep"]["proxy_url"] + "/canon"  # the same proxy ...
        assert ep["url"] != served["url"] + "/canon" and ep["url"].endswith("/canon")  # ... its own replica port
        imgs = images(3, seed=8)
        rotated = np.stack([np.rot90(im, k) for k, im in enumerate(imgs, 1)])
        batch = np.concatenate([imgs, rotated])
        files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(batch)]
        res = post(ep["url"], files=files)
        assert res.status_code == 200, res.text
        preds = res.json()["predictions"]
        check_against(model, batch, preds, ensemble=False)
        _, x = offline(model, batch)
        with torch.no_grad():
            _, info = model.forward_with_info(x)
        assert [p["group_element"]["index"] for p in preds] == info.element.tolist()
        assert all(p["group_element"]["group"] == "C4" and "disagreement" not in p for p in preds)
        degrees = {p["group_element"]["rotation_deg"] for p in preds}
        assert degrees <= {0.0, 90.0, 180.0, 270.0}
        assert [p["pose_deg"] for p in preds] == [p["group_element"]["rotation_deg"] for p in preds]
        assert requests.get(ep["url"] + "/v1/model", timeout=30).json()["kind"] == "canonicalized"
    finally:
        serve.delete("canon")


def test_continuous_pose_is_served_as_an_angle_that_turns_with_the_input(served):
    """A continuous-pose canonicalizer answers the angle it turned each input back by: an image turned by 90
    degrees is answered 90 degrees further on (exact for the C4 net's quarter turns), not only a grid element."""
    from ray import serve

    spec = {"name": "canonicalized", "in_chans": 1, "num_classes": 10, "input_shape": [1, SIZE, SIZE],
            "classes": CLASSES, "kwargs": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4},
                                           "canonicalizer": "equivariant", "canonicalizer_kwargs": {"channels": 4},
                                           "group": "C4", "pose": "angle"}}
    register(build(spec, seed=5), spec, "t-pose", metrics={"upright_accuracy": 0.5})
    cfg = load_config(ServeConfig, {"model": "models:/t-pose@champion", "app_name": "pose",
                                    "route_prefix": "/pose", "batch": {"enabled": False}})
    ep = deploy(cfg)
    try:
        imgs = images(3, seed=9)
        batch = np.concatenate([imgs, np.stack([np.rot90(im, 1) for im in imgs])])
        res = post(ep["url"], files=[("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(batch)])
        assert res.status_code == 200, res.text
        pose = [p["pose_deg"] for p in res.json()["predictions"]]
        assert all(0.0 <= a < 360.0 for a in pose)
        assert any(a % 90.0 > 1.0 for a in pose)  # off the grid: a continuous angle, not an element's rotation
        for a, turned in zip(pose[:3], pose[3:]):
            assert abs((turned - a - 90.0 + 180.0) % 360.0 - 180.0) < 0.05, (a, turned)
    finally:
        serve.delete("pose")


# ------------------------------------------------------------------------------------------------ config
def test_serve_config_file_is_validated_with_serves_own_schema(tmp_path):
    from equiray.errors import ConfigError

    from equiray_pipelines.serve import ModelRef, build_application

    opts = deployment_options("configs/serve_app.yaml", "equiray")
    assert opts["autoscaling_config"]["max_replicas"] == 4 and "num_gpus" in opts["ray_actor_options"]
    cfg = load_config(ServeConfig, {"serve_config": "configs/serve_app.yaml"})
    app = build_application(cfg, ModelRef("models:/x@y", "models:/x/1", "x", "1", "y"), opts)
    deployment = app._bound_deployment  # what `equiray serve run --serve-config` deploys
    assert deployment.ray_actor_options["num_gpus"] == 0 and deployment.ray_actor_options["num_cpus"] == 1
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    assert deployment._deployment_config.user_config["model"]["load_uri"] == "models:/x/1"
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: equiray\n    import_path: equiray_pipelines.serve:build_app\n"
                   "    deployments:\n      - name: EquirayModel\n        num_replicaz: 2\n")
    with pytest.raises(ConfigError, match="num_replicaz"):
        deployment_options(bad, "equiray")


# ------------------------------------------------------------------------------------------------ fuzzing
def test_generated_requests_from_the_openapi_schema_never_get_a_5xx(served):
    """Schemathesis reads the app's own OpenAPI schema and generates requests that fit it and requests that
    break it (negative mode: wrong types, missing keys, odd media types); none may get a 5xx or kill the replica."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    url = served["url"]
    for media in ("image/png", "image/jpeg"):
        schemathesis.serializer.alias(media, "application/octet-stream")
    schema = schemathesis.openapi.from_dict(requests.get(url + "/openapi.json", timeout=30).json())
    seen = {"statuses": [], "media": set()}
    session = requests.Session()

    runs = [("/v1/predict", "POST", GenerationMode.POSITIVE), ("/v1/predict", "POST", GenerationMode.NEGATIVE),
            ("/v1/model", "GET", GenerationMode.POSITIVE), ("/healthz", "GET", GenerationMode.POSITIVE)]
    for path, method, mode in runs:  # (the GETs take no input, so there is nothing to break there)
        op = schema[path][method]

        @settings(max_examples=40 if path == "/v1/predict" else 5, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def drive(case):
            kwargs = case.as_transport_kwargs(base_url=url)
            res = session.request(**{**kwargs, "timeout": 60})
            seen["statuses"].append(res.status_code)
            seen["media"].add(case.media_type)
            assert res.status_code < 500, (case.media_type, kwargs.get("json") or kwargs.get("data"), res.text)
            if res.status_code >= 400:
                assert "error" in res.json() or "detail" in res.json()

        drive()
    assert any(400 <= s < 500 for s in seen["statuses"])  # it did send bad requests
    assert {"application/json", "multipart/form-data"} <= seen["media"]
    res = post(url, data=png(images(1, 9)[0]), headers={"Content-Type": "image/png"})
    assert res.status_code == 200  # and the replica still answers


def test_mutated_and_malformed_payloads_never_get_a_5xx(served):
    """Hypothesis mutates valid PNG/JPEG files (flipped bytes, cuts) and builds odd pixel arrays (NaN, inf,
    huge, ragged, nested objects): every answer is a 200 or a 4xx with a JSON error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url = served["url"]
    session = requests.Session()
    good = png(images(1, 10)[0])
    buf = io.BytesIO()
    Image.fromarray(images(1, 11)[0]).save(buf, "JPEG")
    jpeg = buf.getvalue()

    @st.composite
    def mutated(draw):
        data = bytearray(draw(st.sampled_from([good, jpeg])))
        for _ in range(draw(st.integers(0, 6))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(data)))
        return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)

    numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**40, 10**40),
                        st.floats(0, 1), st.booleans(), st.none(), st.text(max_size=3))
    arrays = st.recursive(numbers, lambda inner: st.lists(inner, max_size=6), max_leaves=60)

    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(["image/png", "image/jpeg", "multipart/form-data", "application/json"]),
           blob=mutated(), instances=st.lists(arrays, max_size=4))
    def drive(kind, blob, instances):
        if kind == "multipart/form-data":
            res = session.post(url + "/v1/predict", files=[("files", ("x.png", blob, "image/png"))], timeout=60)
        elif kind == "application/json":
            body = json.dumps({"instances": instances}, allow_nan=True).encode()
            res = session.post(url + "/v1/predict", data=body, headers={"Content-Type": kind}, timeout=60)
        else:
            res = session.post(url + "/v1/predict", data=blob, headers={"Content-Type": kind}, timeout=60)
        assert res.status_code == 200 or (400 <= res.status_code < 500 and res.json()["error"]["message"]), \
            (kind, res.status_code, res.text[:300])

    drive()
    assert post(url, data=good, headers={"Content-Type": "image/png"}).status_code == 200


# ------------------------------------------------------------------------------------------------ demo stage
def test_demo_serve_stage_sends_upright_and_rotated_images(served, tmp_path):
    from ray import serve

    from equiray.data import prepare
    from equiray_pipelines.demo import serve_stage

    prepare("digits", tmp_path / "digits")
    cfg = load_config(ServeConfig, {"model": "models:/t-ensemble@champion", "app_name": "demo",
                                    "route_prefix": "/demo", "port": 0})
    out = serve_stage(cfg, str(tmp_path / "digits"), 3)
    rows = [line for line in out.table.splitlines() if line.startswith("| test ")]
    assert len(rows) == 3 and "| 0 deg | 90 deg | 180 deg | 270 deg |" in out.table
    assert out.info["name"] == "t-ensemble" and out.requests == 6
    assert "demo" not in serve.status().applications  # its own app is gone ...
    assert requests.get(served["url"] + "/healthz", timeout=30).status_code == 200  # ... the others still serve

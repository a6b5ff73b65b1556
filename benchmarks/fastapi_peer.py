"""The server a user would write in ten minutes instead of `equiray serve run`: FastAPI + uvicorn, one process, no
batching, the registered model loaded with MLflow's own API (``mlflow.pyfunc.load_model``). bench_serve.py measures equiray's endpoint against it.

    .venv/bin/python benchmarks/fastapi_peer.py --model models:/equiray-robust@champion --port 8100

It answers ``POST /v1/predict`` (one raw image/png body, or several multipart files) with the same JSON shape as
equiray (label, class index, probabilities per class), decoding and resizing the images as equiray does, so both
servers do the same work per request. One torch thread, as an equiray replica.
"""
import argparse

import mlflow.pyfunc
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from equiray.inference import decode_image, to_model_input


def create_app(model_uri: str) -> FastAPI:
    loaded = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()  # MLflow's API; then the torch module itself
    model, spec = loaded.model.eval(), loaded.spec  # (not pyfunc's predict: a DataFrame per request costs ~1 ms)
    classes = [str(c) for c in spec.get("classes") or range(spec["num_classes"])]
    in_chans, shape = spec["in_chans"], spec["input_shape"]
    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(request: Request):
        if request.headers.get("content-type", "").startswith("multipart/"):
            form = await request.form()
            bodies = [await f.read() for _, f in form.multi_items()]
        else:
            bodies = [await request.body()]
        x = to_model_input([decode_image(b, in_chans=in_chans) for b in bodies], shape)
        with torch.inference_mode():
            out = model(x)
        probs = (out[0] if isinstance(out, tuple) else out).softmax(-1).tolist()
        return JSONResponse({"predictions": [
            {"label": classes[max(range(len(p)), key=p.__getitem__)], "probabilities": dict(zip(classes, p))}
            for p in probs]})

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/equiray-robust@champion")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning", access_log=False)

"""The baselines of bench/serving_wrk.py, each run as its own process by it:

    python -m bench.serving_baselines stock MODELVERSION_YAML HTTP_PORT GRPC_PORT   # (b) stock kserve
    python -m bench.serving_baselines bare MODELVERSION_YAML HTTP_PORT              # (c) bare FastAPI

Both run the model as their user would write it, `ModelArtifact.predict(pd.DataFrame(instances))`, and print
`serving ... on URL` when started.
"""

from __future__ import annotations

import sys

from fastapi import Request  # at module level: the endpoint's annotation is resolved from these globals

PREDICT = "/v1/models/arrests:predict"


def stock_kserve(record: str, port: int, grpc_port: int) -> None:
    import kserve
    import pandas as pd

    from kubeloop.api.load import load_resources
    from kubeloop.artifact import ModelArtifact

    uri = load_resources(record)[0].spec.artifact_uri

    class Stock(kserve.Model):
        def load(self) -> bool:
            self.artifact = ModelArtifact.load(uri)
            self.ready = True
            return True

        def predict(self, payload, headers=None):
            return {"predictions": self.artifact.predict(pd.DataFrame(payload["instances"])).tolist()}

    model = Stock("arrests")
    model.load()
    print(f"serving stock kserve on http://127.0.0.1:{port}", flush=True)
    kserve.ModelServer(http_port=port, grpc_port=grpc_port).start([model])


def bare_fastapi(record: str, port: int) -> None:
    import pandas as pd
    import uvicorn
    from fastapi import FastAPI

    from kubeloop.api.load import load_resources
    from kubeloop.artifact import ModelArtifact

    artifact = ModelArtifact.load(load_resources(record)[0].spec.artifact_uri)
    app = FastAPI()

    @app.post(PREDICT)
    async def predict(request: Request) -> dict:
        body = await request.json()
        return {"predictions": artifact.predict(pd.DataFrame(body["instances"])).tolist()}

    print(f"serving bare fastapi on http://127.0.0.1:{port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    command = sys.argv[1:2]
    if command == ["stock"]:
        record_, port_, grpc_port_ = sys.argv[2:5]
        sys.argv = sys.argv[:1]  # kserve parses sys.argv when it is imported
        stock_kserve(record_, int(port_), int(grpc_port_))
    elif command == ["bare"]:
        bare_fastapi(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"usage: python -m bench.serving_baselines stock|bare ...: unknown command {sys.argv[1:2]}")

"""The text path: a user's CSV of texts goes through MiniLM (length buckets, ONNX) to a served ensemble."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
from conftest import legonet

TOPICS = {
    0: ["the dog barked at the cat", "a horse ran across the field", "the bird sang in the tree",
        "a cow grazed near the barn", "the fish swam in the pond", "a rabbit hid under the bush"],
    1: ["the train left the station late", "a car stopped at the red light", "the plane landed on the runway",
        "a bus carried children to school", "the ship sailed into the harbour", "a bicycle leaned on the wall"],
    2: ["fresh bread baked in the oven", "a bowl of hot tomato soup", "the cake was covered in cream",
        "rice cooked with beans and spices", "a salad of lettuce and cucumber", "grilled cheese on toast"],
}


def texts() -> pd.DataFrame:
    rows = []
    for label, sentences in TOPICS.items():
        for i in range(80):
            base = sentences[i % len(sentences)]
            rows.append({"sample_id": f"txt-{label}-{i:03d}", "label": label,
                         "text": base + (" " + base.split()[-1]) * (i % 4) + f" number {i}"})
    return pd.DataFrame(rows)


def test_text_data_builds_with_minilm_and_predicts(tmp_path: Path) -> None:
    data = tmp_path / "texts.csv"
    texts().to_csv(data, index=False)
    root = tmp_path / "project"
    settings = {"data.partitions": 2, "projection.dim": 8, "adapters.n": 3, "adapters.k": 2, "adapters.blocks": 3,
                "adapters.train.epochs": 20, "gate.min_accuracy": 0.5,
                "data.reference_fraction": 0.15}
    legonet("init", str(root), "--data", str(data), *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")],
            cwd=tmp_path)
    params = (root / "params.yaml").read_text()
    assert "modality: text" in params and "name: minilm" in params
    built = legonet("build", cwd=root)
    assert "test accuracy (LegoNet ensemble)" in built.stdout
    accuracy = json.loads((root / "metrics/evaluate.json").read_text())["accuracy"]
    assert accuracy > 0.8, f"three easy topics should separate; got {accuracy}"
    assert json.loads((root / "models/encoder.json").read_text())["dim"] == 384

    queries = tmp_path / "queries.csv"
    pd.DataFrame({"sample_id": ["q1", "q2", "q3"],
                  "text": ["a dog chased the rabbit", "the train arrived at the station", "soup with fresh bread"]}
                 ).to_csv(queries, index=False)
    predicted = pd.read_csv(io.StringIO(legonet("predict", str(queries), cwd=root).stdout))
    assert predicted["sample_id"].tolist() == ["q1", "q2", "q3"]
    assert predicted["prediction"].tolist() == [0, 1, 2]

"""Edge deployment: export (TorchScript / ONNX), parity, metadata, predict, profile.

A tiny real checkpoint is trained once per session on the shared CIFAR-100 data
(3 steps; the per-epoch evaluation runs on a 200-image spread of the test set).
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lsskd import deploy
from lsskd.cli import main
from lsskd.config import ConfigError, build_config
from lsskd.data.base import DataBundle, DataError
from lsskd.engine.checkpoint import CheckpointError
from lsskd.engine.profile import count_macs, count_params
from lsskd.engine.trainer import Trainer, build_method
from lsskd.methods.base import Method, register_method
from lsskd.models import build_model
from lsskd.registry import METHODS, MODELS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class _Branchy(Method):
    """Test-only method with training-time extras (an auxiliary head on the pooled
    feature and a per-sample buffer): L = CE(z, y) + CE(aux(h), y)."""

    defaults = {}

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)
        self.aux = nn.Sequential(nn.Linear(backbone.feature_dim, 64), nn.ReLU(), nn.Linear(64, self.num_classes))
        self.register_buffer("store", torch.zeros(self.num_train, self.num_classes))

    def train_forward(self, x, y, idx, mix):
        _, h, logits = self.backbone.forward_features(x)
        return logits, {"ce": F.cross_entropy(logits, y), "aux": F.cross_entropy(self.aux(h), y)}


@pytest.fixture
def branchy_registered():
    """Register the test method only while a test uses it, so other test modules
    that iterate over METHODS never see it."""
    name = "test_deploy_branchy"
    register_method(name)(_Branchy)
    try:
        yield name
    finally:
        METHODS._items.pop(name, None)


def _small_bundle(full: DataBundle) -> DataBundle:
    idx = torch.linspace(0, len(full.test) - 1, 200).round().long()
    return DataBundle(full.train, full.test.subset(idx), None, list(full.mean), list(full.std), full.modality)


def _train(root: Path, cifar_root: Path, bundle: DataBundle, method: str, steps: int = 3) -> Path:
    """A real run directory; ``steps=0`` only writes the initial checkpoint (no training)."""
    cfg = build_config(None, [
        f"out_dir={root}", f"data.root={cifar_root}", "model.name=resnet8", f"method.name={method}",
        "train.epochs=1", f"train.max_steps_per_epoch={max(steps, 1)}", "train.batch_size=32",
        "train.progress=false", "train.tensorboard=false", "train.device=cpu", "optim.lr=0.01",
    ])
    trainer = Trainer(cfg, bundle=bundle)
    if steps == 0:
        trainer.save(0, 0)
        return root / "last.pt"
    trainer.fit()
    return root / "best.pt"


@pytest.fixture(scope="session")
def small_bundle(cifar_bundle):
    return _small_bundle(cifar_bundle)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory, cifar_root, small_bundle):
    return _train(tmp_path_factory.mktemp("deploy_ce"), cifar_root, small_bundle, "ce")


@pytest.fixture(scope="session")
def test_x(cifar_bundle, ckpt):
    """64 real test images spread over the classes, normalised with the checkpoint's stats."""
    dep = deploy.load_deployed(ckpt)
    idx = torch.linspace(0, len(cifar_bundle.test) - 1, 64).round().long()
    return dep.normalize(cifar_bundle.test.x[idx])


def _no_temp_files(folder: Path):
    left = [p.name for p in folder.iterdir() if p.name.startswith(".") or ".tmp" in p.name]
    assert left == []


def test_deployed_model_is_the_methods_deploy(ckpt, small_bundle, test_x):
    """The backbone rebuilt from the checkpoint computes exactly what the rebuilt
    method's deploy() computes."""
    dep = deploy.load_deployed(ckpt)
    from lsskd.engine.evaluation import load_trained

    cfg, st = load_trained(ckpt)
    method = build_method(cfg, small_bundle)
    method.load_state_dict(st["method"])
    method.eval()
    with torch.no_grad():
        assert torch.equal(dep.model(test_x), method.deploy()(test_x))
    assert not dep.model.training
    assert dep.classes == small_bundle.classes and dep.input_shape == [3, 32, 32]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_parity_and_metadata(ckpt, test_x, cifar_bundle, tmp_path, fmt):
    dep = deploy.load_deployed(ckpt)
    out = tmp_path / f"model.{fmt}"
    meta = deploy.export(dep, fmt, out, test_x, "test")
    assert meta["parity"]["max_abs_diff"] <= 1e-4 and meta["parity"]["n"] == 64

    # Independent reload of the written file with the runtime itself.
    with torch.no_grad():
        ref = dep.model(test_x)
        if fmt == "torchscript":
            got = torch.jit.load(str(out))(test_x)
            one = torch.jit.load(str(out))(test_x[:1])
        else:
            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {"input": test_x.numpy()})[0])
            one = torch.from_numpy(sess.run(None, {"input": test_x[:1].numpy()})[0])
    assert got.shape == (64, 100)
    assert float((got - ref).abs().max()) <= 1e-4
    assert float((one - ref[:1]).abs().max()) <= 1e-4  # the batch axis is free
    # Not a constant model: the logits differ across images.
    assert float(ref.std(0).mean()) > 1e-3

    side = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    assert side == json.loads(json.dumps(meta))
    assert side["format"] == "lsskd-export-1" and side["model_format"] == fmt
    assert side["classes"] == cifar_bundle.classes and len(side["classes"]) == 100
    assert side["input_shape"] == [3, 32, 32] and side["modality"] == "image"
    st = torch.load(ckpt, weights_only=True)
    assert side["mean"] == pytest.approx(st["mean"]) and side["std"] == pytest.approx(st["std"])
    assert side["config"]["model"]["name"] == "resnet8" and side["config"]["method"]["name"] == "ce"
    assert side["lsskd_version"] == __import__("lsskd").__version__
    data = out.read_bytes()
    assert side["sha256"] == hashlib.sha256(data).hexdigest() and side["bytes"] == len(data)
    assert side["params"] == count_params(build_model("resnet8", 100))
    assert side["opset"] == (17 if fmt == "onnx" else None)
    if fmt == "onnx":
        proto = onnx.load(str(out))
        assert proto.opset_import[0].version == 17
        dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim0.dim_param == "batch"
    _no_temp_files(tmp_path)

    # The copy embedded in the model file is enough without the sidecar.
    lone = tmp_path / "lone" / out.name
    lone.parent.mkdir()
    lone.write_bytes(data)
    emb = deploy.read_metadata(lone)
    assert emb["classes"] == side["classes"] and emb["mean"] == side["mean"]


def test_failed_parity_keeps_previous_export(ckpt, test_x, tmp_path):
    dep = deploy.load_deployed(ckpt)
    out = tmp_path / "m.onnx"
    deploy.export(dep, "onnx", out, test_x[:8], "test")
    before = out.read_bytes()
    with pytest.raises(deploy.ExportError, match="was not written"):
        deploy.export(dep, "onnx", out, test_x[:8], "test", tol=-1.0)
    assert out.read_bytes() == before
    _no_temp_files(tmp_path)
    with pytest.raises(ConfigError, match="tflite"):
        deploy.export(dep, "tflite", tmp_path / "m.tflite")


def _test_pngs(cifar_root: Path):
    """A few real PNGs from the shared test folder with their row in the test split
    (rows are ordered by sorted class folder, then sorted file name; 100 per class)."""
    classes = sorted(p.name for p in (cifar_root / "test").iterdir() if p.is_dir())
    out = []
    for c in (0, 37, 99):
        files = sorted((cifar_root / "test" / classes[c]).glob("*.png"))
        out.append((files[5], c * 100 + 5))
    return out


def test_cli_export_and_predict_all_backends(ckpt, cifar_root, cifar_bundle, tmp_path, capsys):
    onnx_out, ts_out = tmp_path / "m.onnx", tmp_path / "m.ts"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(onnx_out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["parity"]["max_abs_diff"] <= 1e-4 and rep["parity"]["n"] == 64
    assert json.loads((tmp_path / "m.onnx.json").read_text())["parity"] == rep["parity"]
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(ts_out),
                 "--parity-images", "16", "--parity-inputs", "random"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["parity"]["max_abs_diff"] <= 1e-4 and "N(0,1)" in rep["parity"]["inputs"]
    _no_temp_files(tmp_path)

    pngs = _test_pngs(cifar_root)
    files = [str(p) for p, _ in pngs]
    dep = deploy.load_deployed(ckpt)
    rows = torch.tensor([r for _, r in pngs])
    # Decoding a file reproduces the dataset's tensor exactly.
    raw = deploy.load_inputs([Path(f) for f in files], dep.input_shape, "image")
    assert torch.equal(raw, cifar_bundle.test.x[rows])
    with torch.no_grad():
        want = torch.softmax(dep.model(dep.normalize(cifar_bundle.test.x[rows])), -1)

    results = {}
    for flag, target in (("--checkpoint", ckpt), ("--model", onnx_out), ("--model", ts_out)):
        js = tmp_path / f"pred_{Path(target).suffix[1:]}.json"
        assert main(["predict", flag, str(target), *files, "--topk", "5", "--json", str(js)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 3 and lines[0].startswith(files[0])
        doc = json.loads(js.read_text())
        preds = doc["predictions"]
        assert [p["file"] for p in preds] == files
        for i, p in enumerate(preds):
            probs = [t["prob"] for t in p["topk"]]
            assert len(probs) == 5
            assert probs == sorted(probs, reverse=True)
            assert 0 < sum(probs) <= 1 + 1e-6
            for t in p["topk"]:
                assert dep.classes[t["index"]] == t["class"]
                assert t["prob"] == pytest.approx(float(want[i, t["index"]]), abs=1e-5)
            assert p["topk"][0]["index"] == int(want[i].argmax())
        results[doc["backend"]] = [[t["index"] for t in p["topk"]] for p in preds]
    assert set(results) == {"checkpoint", "onnx", "torchscript"}
    assert results["checkpoint"] == results["onnx"] == results["torchscript"]

    # A whole folder, JSON to stdout.
    folder = cifar_root / "test" / dep.classes[3]
    assert main(["predict", "--model", str(onnx_out), str(folder), "--topk", "2", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["predictions"]) == 100 and all(len(p["topk"]) == 2 for p in doc["predictions"])


def test_predict_errors(ckpt, tmp_path, capsys):
    dep = deploy.load_deployed(ckpt)
    out = tmp_path / "m.onnx"
    deploy.export(dep, "onnx", out)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", "--model", str(out), str(bad)]) == 2
    assert f"cannot read image {bad}" in capsys.readouterr().err
    assert main(["predict", "--model", str(out), str(tmp_path / "missing.png")]) == 2
    assert "input not found" in capsys.readouterr().err
    # Metadata from another export: the checksum no longer matches.
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "m.onnx.json").write_text(json.dumps(meta))
    with pytest.raises(deploy.ExportError, match="does not match the sha256"):
        deploy.open_model(model=out)
    # Neither sidecar nor embedded metadata.
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(deploy.onnx_bytes(dep.model, torch.zeros(1, 3, 32, 32)))
    with pytest.raises(DataError, match="no metadata for"):
        deploy.open_model(model=plain)
    with pytest.raises(CheckpointError, match="not found"):
        deploy.load_deployed(tmp_path / "nope.pt")


@pytest.mark.parametrize("method", ["test_deploy_branchy", "lsskd"])
def test_export_strips_training_parts(method, branchy_registered, tmp_path_factory, cifar_root, small_bundle,
                                      test_x, tmp_path):
    if method not in METHODS:
        pytest.skip(f"method {method} is not registered")
    ck = _train(tmp_path_factory.mktemp(f"deploy_{method}"), cifar_root, small_bundle, method, steps=0)
    st = torch.load(ck, weights_only=True)
    from lsskd.engine.evaluation import load_trained

    cfg, _ = load_trained(ck)
    trained = build_method(cfg, small_bundle)
    trained.load_state_dict(st["method"])
    n_backbone = count_params(build_model("resnet8", 100))
    assert count_params(trained) > n_backbone  # the method really has extras

    dep = deploy.load_deployed(ck)
    assert count_params(dep.model) == n_backbone
    ts_out, onnx_out = tmp_path / "m.ts", tmp_path / "m.onnx"
    meta = deploy.export(dep, "torchscript", ts_out, test_x, "test")
    deploy.export(dep, "onnx", onnx_out, test_x, "test")
    assert meta["params"] == n_backbone
    ts = torch.jit.load(str(ts_out))
    assert sum(p.numel() for p in ts.parameters()) == n_backbone
    assert set(ts.state_dict()) == set(build_model("resnet8", 100).state_dict())
    # ONNX may fold batch norms into convolutions, so compare against the backbone's
    # whole state (params + BN statistics) as an upper bound.
    proto = onnx.load(str(onnx_out))
    n_init = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    n_state = sum(v.numel() for k, v in dep.model.state_dict().items() if v.is_floating_point())
    assert n_init <= n_state < count_params(trained)
    trained.eval()
    with torch.no_grad():
        assert torch.equal(ts(test_x), trained.deploy()(test_x))
    _no_temp_files(tmp_path)


def test_profile(ckpt, tmp_path, capsys):
    js = tmp_path / "profile.json"
    assert main(["profile", "--checkpoint", str(ckpt), "--compare-model", "resnet20", "--warmup", "1",
                 "--repeats", "3", "--rounds", "1", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "latency ratio deployed/plain" in text
    rep = json.loads(js.read_text())
    rows = rep["rows"]
    r8 = build_model("resnet8", 100)
    assert rows["deployed"]["params"] == rows["plain"]["params"] == count_params(r8)
    assert rows["deployed"]["macs"] == rows["plain"]["macs"] == count_macs(r8, (3, 32, 32))
    assert rows["compare:resnet20"]["params"] == count_params(build_model("resnet20", 100))
    for key in ("deployed", "plain", "compare:resnet20"):
        assert rows[key]["latency"]["calls"] == 3 and rows[key]["latency_ms"] > 0
    assert rep["latency_ratio_deployed_over_plain"] == pytest.approx(
        rows["deployed"]["latency_ms"] / rows["plain"]["latency_ms"])
    assert rep["training_model"]["params"] == count_params(r8)  # plain CE: nothing extra
    assert rep["training_model"]["checkpoint_bytes"] == ckpt.stat().st_size
    assert rows["deployed"]["torchscript_bytes"] > 4 * count_params(r8)


# Exportability of every registered backbone: a cheap set by default, all of them with -m slow.
_FAST = ["resnet8", "tinycnn1d", "wrn_16_1", "mobilenetv2_w05", "shufflev2", "vgg8"]


def _calibrated(name: str) -> nn.Module:
    """A randomly initialised model whose BN statistics are estimated on random inputs,
    so its logits have a sane scale (fresh BN stats make deep nets' logits explode)."""
    torch.manual_seed(0)
    m = build_model(name, 10)
    bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None
    m.train()
    with torch.no_grad():
        m(torch.randn(8, *m.probe_shape))
    return m.eval()


def _check_model_exports(name: str, tmp_path: Path):
    if name not in MODELS:
        pytest.skip(f"model {name} is not registered")
    m = _calibrated(name)
    x = torch.randn(3, *m.probe_shape, generator=torch.Generator().manual_seed(1))
    for fmt in deploy.FORMATS:
        f = tmp_path / f"{name}.{fmt}"
        f.write_bytes(deploy.serialize(m, fmt, torch.zeros(2, *m.probe_shape)))
        diff = deploy.max_abs_diff(deploy.load_runner(f, {"model_format": fmt}), m, x)
        assert diff <= 1e-4, (name, fmt, diff)


@pytest.mark.parametrize("name", _FAST)
def test_backbone_exports(name, tmp_path):
    _check_model_exports(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(MODELS.names()) - set(_FAST)))
def test_backbone_exports_all(name, tmp_path):
    _check_model_exports(name, tmp_path)

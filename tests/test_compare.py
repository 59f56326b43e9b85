"""`sae-seeds compare` and `replication.compare_saes`: numbers, report files, layouts, bad inputs.

Tiny SAEs only (d_in 64, 128 latents): a trained pair (the project's trainer on synthetic sparse
activations) for the notebook-01 check, hand-made families for everything else.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import replication
from replication import cli
from replication.analysis.matching import match, shared_masks
from replication.analysis.stability import kseed_only_in_base, untrained_pw_mcc
from replication.analysis.stats import bootstrap_ci
from replication.compare import compare_saes, expand_inputs
from replication.sae.architectures import build_sae, firing_counts
from replication.sae.checkpoints import export_sae, fold_input_scale, load_directions, load_sae, sae_from_state_dict, save_sae
from replication.sae.training import DataConfig, TrainConfig, evaluate_sae, train_saes

D_IN, N_LAT, K = 64, 128, 4
ROOT = Path(__file__).resolve().parent.parent


def _sparse_acts(n_rows: int, seed: int = 0) -> np.ndarray:
    """Sparse combinations of 96 ground-truth directions (what an SAE can learn)."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((96, D_IN))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    codes = rng.exponential(1.0, (n_rows, 96)) * (rng.random((n_rows, 96)) < 0.04)
    return (3.0 * codes @ feats + 0.01 * rng.standard_normal((n_rows, D_IN))).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two seeds trained by `training.train_saes` (input_scale 0.5) and written with `save_sae`."""
    root = tmp_path_factory.mktemp("family")
    acts = _sparse_acts(4096)
    data = DataConfig(batch_size=256, n_tokens=256 * 40, data_seed=0, input_scale=0.5, hookpoint="layer")
    cfgs = [TrainConfig(architecture="topk", n_latents=N_LAT, k=K, seed=s, lr=4e-3) for s in (0, 1)]
    results = train_saes(acts, cfgs, data, out_dirs=[root / f"seed{s}" for s in (0, 1)], progress=False,
                         heldout=acts[:1024])
    return root, results, acts[:1024]


def _family(n_saes: int, d_in: int = 32, n: int = 64, n_stable: int = 40, noise: float = 0.05,
            seed: int = 0) -> tuple[list, np.ndarray]:
    """`n_saes` TopK SAEs whose first `n_stable` ground-truth directions recur (permuted, with noise)
    in every seed; the other latents are random. Returns (saes, permutations)."""
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal((n_stable, d_in))
    saes, perms = [], []
    for s in range(n_saes):
        rows = np.concatenate([truth + noise * rng.standard_normal(truth.shape),
                               rng.standard_normal((n - n_stable, d_in))])
        perm = rng.permutation(n)                       # latent perm[i] of this SAE holds row i
        weight = np.empty_like(rows)
        weight[perm] = rows
        sae = build_sae("topk", d_in, n, k=4, seed=s)
        with torch.no_grad():
            sae.encoder.weight.copy_(torch.from_numpy(weight))
            sae.W_dec.copy_(torch.from_numpy(weight / np.linalg.norm(weight, axis=1, keepdims=True)))
        saes.append(sae)
        perms.append(perm)
    return saes, np.stack(perms)


def _no_debris(parent: Path, name: str) -> None:
    """Neither the report folder nor a temporary sibling of it exists."""
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ----------------------------------------------------------------------------------------------
# the headline numbers
# ----------------------------------------------------------------------------------------------
def test_command_prints_notebook01_shared_fraction(trained, tmp_path) -> None:
    """`python -m replication compare seed0 seed1` prints what notebook 01 computes for the pair."""
    root, results, _ = trained
    dirs = [r.sae.latent_directions(name=f"seed{s}") for r, s in zip(results, (0, 1))]   # notebook 01's input
    res = match(dirs[0], dirs[1], cache=False)
    masks = shared_masks(res, 0.7)
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "replication", "compare", str(root / "seed0"), str(root / "seed1"),
                           "--out", str(out), "--n-boot", "200", "--no-plots"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "loading seed0" in proc.stdout and "matched seed0 vs seed1" in proc.stdout   # progress
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("shared (threshold)"))
    assert line.split()[2] == f"{masks['threshold'].mean():.3f}"
    report = json.loads((out / "report.json").read_text())
    for definition in ("threshold", "agree", "decoder"):
        assert report["shared_fraction"][definition]["estimate"] == pytest.approx(float(masks[definition].mean()), abs=0)
    ci = bootstrap_ci(masks["threshold"], n_boot=200)
    assert report["shared_fraction"]["threshold"]["low"] == ci["low"]
    assert report["pw_mcc"]["trained"] == pytest.approx(float(res.dec_cos.mean()))
    floor = untrained_pw_mcc("topk", D_IN, N_LAT, 1, seeds=(0, 1), cache=False)["estimate"]
    assert report["pw_mcc"]["untrained"] == pytest.approx(floor)
    lo, hi = report["pw_mcc"]["ci95_seed"]
    assert lo <= report["pw_mcc"]["trained"] <= hi
    assert report["pw_mcc"]["trained"] > report["pw_mcc"]["untrained"]
    assert report["kseed"] is None                      # two SAEs: no k-seed curve
    csv = pd.read_csv(out / "per_latent.csv")
    assert len(csv) == 2 * N_LAT and set(csv.label) <= {"stable", "unstable"}


def test_api_five_seeds_kseed_fits_and_per_latent(tmp_path) -> None:
    saes, perms = _family(5)
    objects = [saes[0], saes[1].latent_directions(), *saes[2:]]          # our SAE and LatentDirections mixed
    report = replication.compare_saes(objects, names=[f"s{i}" for i in range(5)], n_boot=100, out_dir=tmp_path / "r")
    assert isinstance(report, replication.Report)
    n = saes[0].n_latents
    # the recurring latents are found and matched to the right partner
    res = report.matchings[(0, 3)]
    stable0 = perms[0][:40]
    assert np.array_equal(res.dec_partner[stable0], perms[3][:40])
    assert report.shared_fraction["threshold"] == pytest.approx(40 / 64)
    # k-seed curve = the stability module's exact average; both fits present for 5 SAEs
    counts = np.stack([report.per_latent.query("sae == @name").shared_with.to_numpy() for name in report.names])
    ks = report.summary["kseed"]
    assert ks["curves"]["threshold"] == {str(k): v for k, v in kseed_only_in_base(counts, 5).items()}
    assert ks["fits"]["threshold"]["with_offset"]["ok"] is not None and "without_offset" in ks["fits"]["threshold"]
    # per-latent table: one row per (SAE, latent), partner columns per other SAE, p = shared_with / 4
    df = pd.read_csv(tmp_path / "r" / "per_latent.csv")
    assert len(df) == 5 * n
    assert {"dec_partner[s3]", "dec_cos[s3]", "enc_partner[s3]", "enc_cos[s3]", "shared[s3]"} <= set(df.columns)
    row0 = df[df.sae == "s0"].set_index("latent")
    np.testing.assert_array_equal(row0["dec_partner[s3]"].to_numpy(), res.dec_partner)
    assert row0["dec_partner[s0]"].isna().all()
    np.testing.assert_allclose(df.reappearance_probability, df.shared_with / 4)
    assert (df.loc[df.reappearance_probability == 1, "label"] == "stable").all()
    assert (df.loc[df.reappearance_probability == 0, "label"] == "unstable").all()
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert files == {"report.json", "per_latent.csv", "pairs.csv", "fig1_cosines.png", "fig1_cosines.pdf",
                     "fig2_kseed.png", "fig2_kseed.pdf"}
    pairs = pd.read_csv(tmp_path / "r" / "pairs.csv")
    assert len(pairs) == 10
    # chance level (random directions) is far below
    assert report.summary["chance_shared_fraction"]["threshold"] < 0.05
    assert "only in base at k = 5" in report.table()


def test_activations_add_fvu_and_frequency_and_width_mismatch_is_refused(trained, tmp_path) -> None:
    root, results, heldout = trained
    np.save(tmp_path / "acts.npy", heldout)
    report = compare_saes([root / "seed0", root / "seed1"], activations=tmp_path / "acts.npy", n_boot=50,
                          out_dir=tmp_path / "r", plots=False)
    for name, res in zip(report.names, results):
        fvu = report.summary["per_sae"][name]["fvu"]
        assert fvu == pytest.approx(evaluate_sae(res.sae, heldout)["fvu"], rel=1e-9)
        assert fvu == pytest.approx(res.metrics["fvu"], rel=1e-6)          # the trainer's recorded held-out FVU
    freq = firing_counts(results[1].sae, heldout, progress=False) / len(heldout)
    np.testing.assert_allclose(report.per_latent.query("sae == 'seed1'").firing_frequency, freq)
    np.save(tmp_path / "narrow.npy", heldout[:, :32])
    with pytest.raises(ValueError, match=r"d_in\) 64.*width 32"):
        compare_saes([root / "seed0", root / "seed1"], activations=tmp_path / "narrow.npy", out_dir=tmp_path / "bad")
    _no_debris(tmp_path, "bad")
    assert cli.main(["compare", str(root / "seed0"), str(root / "seed1"), "--activations",
                     str(tmp_path / "narrow.npy"), "--out", str(tmp_path / "bad2")]) == 2
    _no_debris(tmp_path, "bad2")


# ----------------------------------------------------------------------------------------------
# layouts, globs, hub ids
# ----------------------------------------------------------------------------------------------
def test_saelens_and_dictionary_learning_layouts_read_whole(tmp_path) -> None:
    """SAELens / dictionary_learning folders (documented tensor names) load as whole SAEs whose
    encode/decode follow those libraries' equations."""
    rng = np.random.default_rng(0)
    d, n, k = 12, 20, 3
    W_enc, W_dec = rng.standard_normal((d, n)), rng.standard_normal((n, d))
    b_enc, b_dec = rng.standard_normal(n), rng.standard_normal(d)
    x = torch.from_numpy(rng.standard_normal((50, d)))
    t = {name: torch.from_numpy(v) for name, v in dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec).items()}

    def reference(apply_b_dec: bool, topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
        pre = (x - t["b_dec"] * apply_b_dec) @ t["W_enc"] + t["b_enc"]
        if topk:
            vals, idx = pre.topk(k, dim=-1)
            acts = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        else:
            acts = pre.relu()
        return acts, acts @ t["W_dec"] + t["b_dec"]

    for arch, apply_b_dec in (("standard", True), ("standard", False), ("topk", True), ("topk", False)):
        folder = tmp_path / f"saelens-{arch}-{apply_b_dec}"
        folder.mkdir()
        save_file(t, str(folder / "sae_weights.safetensors"))
        cfg = {"architecture": arch, "d_in": d, "d_sae": n, "apply_b_dec_to_input": apply_b_dec,
               "normalize_activations": "none"} | ({"k": k} if arch == "topk" else {})
        (folder / "cfg.json").write_text(json.dumps(cfg))
        sae = load_sae(folder)
        acts, recon = reference(apply_b_dec, arch == "topk")
        with torch.no_grad():
            out = sae(x)
        np.testing.assert_allclose(out["x_hat"].numpy(), recon.numpy(), atol=1e-10)
        if arch == "standard":
            np.testing.assert_allclose(out["latents"].numpy(), acts.numpy(), atol=1e-10)
    # dictionary_learning AutoEncoder: encoder.weight [n, d], decoder.weight [d, n], bias [d]
    folder = tmp_path / "dl"
    folder.mkdir()
    torch.save({"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"],
                "decoder.weight": t["W_dec"].T.contiguous(), "bias": t["b_dec"]}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": d,
                                                                "dict_size": n}}))
    with torch.no_grad():
        np.testing.assert_allclose(load_sae(folder)(x)["x_hat"].numpy(), reference(True, False)[1].numpy(), atol=1e-10)
    # square weights (n == d_in) fall back to the library convention; different widths are oriented by shape
    sq = sae_from_state_dict({"W_enc": torch.eye(4) * 2, "W_dec": torch.eye(4), "b_enc": torch.zeros(4),
                              "b_dec": torch.zeros(4)}, {"architecture": "standard"})
    assert sq.n_latents == 4 and sq.d_in == 4
    # SAELens folder through the whole command, directions equal load_directions'
    report = compare_saes([tmp_path / "saelens-topk-True", tmp_path / "saelens-topk-False"], n_boot=20, plots=False)
    assert report.summary["per_sae"][report.names[0]]["layout"] == "saelens"
    np.testing.assert_allclose(report.matchings[(0, 1)].dec_cos, 1.0, atol=1e-6)


def test_glob_natural_order_and_hub_id_offline(tmp_path, monkeypatch) -> None:
    saes, _ = _family(3)
    for s, sae in zip((10, 2, 1), saes):
        save_sae(sae, tmp_path / f"seed{s}", "layer")
    assert [Path(p).name for p in expand_inputs([str(tmp_path / "seed*")])] == ["seed1", "seed2", "seed10"]
    report = compare_saes([str(tmp_path / "seed*")], n_boot=20, plots=False)
    assert report.names == ["seed1", "seed2", "seed10"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a local path.*Hugging Face Hub"):
        compare_saes(["nobody-here/no-such-sae-repo", str(tmp_path / "seed1")])


# ----------------------------------------------------------------------------------------------
# export: sparsify reads our checkpoints in raw-activation units
# ----------------------------------------------------------------------------------------------
def test_export_folds_input_scale(trained, tmp_path) -> None:
    root, results, heldout = trained
    sae = results[0].sae
    assert sae.input_scale == 0.5
    raw = fold_input_scale(sae)
    assert raw.input_scale == 1.0
    torch.testing.assert_close(raw.W_dec.norm(dim=1), torch.ones(N_LAT), atol=1e-5, rtol=0)
    x = torch.from_numpy(heldout)
    with torch.no_grad():
        ours, theirs = sae(x * 0.5), raw(x)
    assert torch.equal(ours["indices"], theirs["indices"])
    torch.testing.assert_close(theirs["x_hat"], ours["x_hat"] / 0.5, atol=1e-5, rtol=1e-5)
    for layout, weights in (("sparsify", "sae.safetensors"), ("saelens", "sae_weights.safetensors")):
        folder = export_sae(root / "seed0", tmp_path / layout, layout=layout)
        assert (folder / weights).exists()
        cfg = json.loads((folder / "cfg.json").read_text())
        assert "input_scale" not in cfg
        back = load_sae(folder)
        assert back.input_scale == 1.0
        assert evaluate_sae(back, heldout)["fvu"] == pytest.approx(results[0].metrics["fvu"], rel=1e-5)
        np.testing.assert_allclose(load_directions(folder).decoder, sae.W_dec.detach().numpy(), atol=1e-6)
    assert cli.main(["export", str(root / "seed1"), str(tmp_path / "cli-export"), "--layout", "saelens"]) == 0
    with pytest.raises(ValueError, match="sparsify only has TopK"):
        export_sae(build_sae("relu", 8, 16, seed=0), tmp_path / "relu")


# ----------------------------------------------------------------------------------------------
# bad inputs: a clear message, nothing written
# ----------------------------------------------------------------------------------------------
def _two_saved(tmp_path: Path, d_in: tuple[int, int] = (32, 32)) -> list[Path]:
    folders = []
    for s, d in enumerate(d_in):
        folders.append(save_sae(build_sae("topk", d, 64, k=4, seed=s), tmp_path / f"seed{s}", "layer").parent)
    return folders


def _refused(args: list, match: str, tmp_path: Path, capsys) -> None:
    """Both the API and the command refuse `args` with `match`, and leave no report behind."""
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        compare_saes(args, out_dir=tmp_path / "out")
    _no_debris(tmp_path, "out")
    assert cli.main(["compare", *map(str, args), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and len(err.strip().splitlines()) == 1
    _no_debris(tmp_path, "out2")


def test_different_d_in(tmp_path, capsys) -> None:
    a, b = _two_saved(tmp_path, (32, 48))
    _refused([a, b], r"different input widths: 'seed0' has d_in 32, 'seed1' has d_in 48", tmp_path, capsys)


def test_folder_of_no_known_layout(tmp_path, capsys) -> None:
    a, _ = _two_saved(tmp_path)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "weights.bin").write_bytes(b"x")
    (odd / "notes.txt").write_text("hi")
    _refused([a, odd], r"unrecognised SAE folder.*\(sparsify\).*\(SAELens\).*\(dictionary_learning\).*"
                       r"found: \['notes.txt', 'weights.bin'\]", tmp_path, capsys)


def test_corrupt_safetensors(tmp_path, capsys) -> None:
    a, b = _two_saved(tmp_path)
    weights = b / "layer" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _refused([a, b], r"checksum mismatch for .*sae.safetensors", tmp_path, capsys)
    (b / "layer" / "training.json").unlink()                  # a third-party folder: no checksum to compare
    _refused([a, b], r"cannot read .*sae.safetensors: corrupt or not a safetensors file", tmp_path, capsys)
    lens = tmp_path / "lens"
    lens.mkdir()
    (lens / "sae_weights.safetensors").write_bytes(b"\x00" * 64)
    _refused([a, lens], r"cannot read .*sae_weights.safetensors: corrupt", tmp_path, capsys)


def test_nan_weights(tmp_path, capsys) -> None:
    sae = build_sae("topk", 32, 64, k=4, seed=1)
    with torch.no_grad():
        sae.W_dec[3, 5] = float("nan")
    a, _ = _two_saved(tmp_path)
    b = save_sae(sae, tmp_path / "nan", "layer").parent
    _refused([a, b], r"NaN or infinite weights in W_dec \(1 of 2048 values\)", tmp_path, capsys)
    with pytest.raises(ValueError, match="NaN or infinite"):
        compare_saes([a, sae])


def test_single_checkpoint(tmp_path, capsys) -> None:
    a, _ = _two_saved(tmp_path)
    _refused([a], r"need at least two SAEs .*got 1", tmp_path, capsys)
    with pytest.raises(FileNotFoundError, match="no checkpoint matches"):
        compare_saes([str(tmp_path / "nothing*"), a])


def test_report_replaced_atomically(tmp_path, monkeypatch) -> None:
    saes, _ = _family(2)
    out = tmp_path / "r"
    compare_saes(saes, out_dir=out, n_boot=20, plots=False)
    before = (out / "report.json").read_bytes()
    from replication import compare as compare_module

    def boom(self, folder):
        (folder / "half.png").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(compare_module.Report, "_plot", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        compare_saes(saes, out_dir=out, n_boot=30)
    assert (out / "report.json").read_bytes() == before and not (out / "half.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_example_report_through_saelens_layout(trained, tmp_path) -> None:
    """The README example: two seeds exported to SAELens, read back, compared; numbers unchanged."""
    root, results, heldout = trained
    np.save(tmp_path / "acts.npy", heldout)
    direct = compare_saes([root / "seed0", root / "seed1"], n_boot=50, plots=False)
    assert cli.main(["example", str(root), "--out", str(tmp_path / "ex"), "--export-dir", str(tmp_path / "lens"),
                     "--activations", str(tmp_path / "acts.npy")]) == 0
    report = json.loads((tmp_path / "ex" / "report.json").read_text())
    assert {v["layout"] for v in report["per_sae"].values()} == {"saelens"}
    assert report["shared_fraction"]["threshold"]["estimate"] == direct.shared_fraction["threshold"]
    for s, res in zip(("seed0", "seed1"), results):      # FVU on raw activations = the trainer's record
        assert report["per_sae"][s]["fvu"] == pytest.approx(res.metrics["fvu"], rel=1e-5)
    assert (tmp_path / "lens" / "seed0" / "sae_weights.safetensors").exists()

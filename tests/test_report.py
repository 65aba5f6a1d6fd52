"""The visual report (slice2vol.report): ``reconstruct --report`` and ``slice2vol report``.

One tiny simulated case (a synthetic 'brain' of a few ellipsoids at 2 mm, three stacks of 2 mm
pixels and 4 mm slices with mild motion) is reconstructed once through the CLI at 3 mm, with the
registration and SVR schedules trimmed (monkeypatched) to what a report needs: poses, weights and a
volume, not a good one.  The tests check the page's integrity (every referenced file exists, every
PNG decodes, nothing external is referenced, the expected sections are there) rather than the
figures' looks, which were checked by eye in a browser.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import html.parser
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import slice2vol.core.preprocess as preprocess
import slice2vol.methods.svr as svr
from slice2vol.cli.parser import main
from slice2vol.core.image import Volume
from slice2vol.core.transforms import params_to_matrix
from slice2vol.report import REPORT_ARRAYS, REPORT_DATA, REPORT_HTML, load_report_arrays, slice_motion
from slice2vol.simulation.simulate import SimulationConfig, save_simulation, simulate_stacks

FAST = ["--device", "cpu", "--iterations", "1", "--resolution", "3", "--no-progress"]
SECTIONS = ("summary", "volume", "consistency", "slices", "motion", "outliers")


def _phantom() -> Volume:
    """A 48 mm ellipsoid with brighter and darker inclusions, 2 mm voxels, axis-aligned."""
    n, res = 28, 2.0
    g = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * res
    x, y, z = torch.meshgrid(g, g, g, indexing="ij")
    inside = (x / 24) ** 2 + (y / 20) ** 2 + (z / 18) ** 2 < 1
    v = torch.where(inside, torch.tensor(100.0), torch.tensor(0.0))
    for c, r, val in (((-8, 4, 2), 7, 180.0), ((9, -5, -3), 5, 40.0), ((0, 10, 8), 4, 150.0)):
        v = torch.where(((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < r * r, torch.tensor(val), v)
    A = np.diag([res, res, res, 1.0])
    A[:3, 3] = -(n - 1) / 2 * res
    return Volume(v, A, inside)


@pytest.fixture(scope="module")
def recon(tmp_path_factory) -> Path:
    """A folder with stacks, and a reconstruction written with every output option."""
    root = tmp_path_factory.mktemp("report")
    vol = _phantom()
    cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=2.0, thickness=4.0,
                           motion="mild", noise=0.02, margin=4.0)
    save_simulation(simulate_stacks(vol, vol.mask, cfg, torch.Generator().manual_seed(0)), root / "stacks")
    stacks = [root / "stacks" / f"stack_{i:02d}.nii.gz" for i in range(3)]
    masks = [root / "stacks" / f"mask_{i:02d}.nii.gz" for i in range(3)]
    out = root / "out"

    @dataclasses.dataclass
    class FastConfig(svr.SVRConfig):
        coarse_iterations: int = 0
        reg_iterations: int = 2
        cg_iterations: int = 4
        final_cg_iterations: int = 4

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(svr, "SVRConfig", FastConfig)
        mp.setattr(preprocess, "register_stacks",
                   functools.partial(preprocess.register_stacks, resolution=3.0, sigmas=(2.0,), iterations=3))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = _reconstruct(stacks, masks, out)
    assert rc == 0
    (out / "stdout.txt").write_text(buf.getvalue())
    return out


def _reconstruct(stacks, masks, out) -> int:
    return main([str(a) for a in ["reconstruct", *stacks, "--stack-masks", *masks, "-o", out / "recon.nii.gz",
                                "--output-transforms", out / "transforms.json", "--output-simulated", out / "sim",
                                "--report", out / "report", *FAST]])


class _Refs(html.parser.HTMLParser):
    """Collects the ``src``/``href`` attributes and element ids of a page."""

    def __init__(self):
        super().__init__()
        self.refs, self.ids, self.tags = [], set(), set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith("#"):
                self.refs.append(v)
            if k == "id":
                self.ids.add(v)


def check_page(folder: Path, n_stacks: int = 3) -> str:
    """The page in ``folder`` is complete and self-contained; returns its text."""
    import matplotlib.image
    from PIL import Image

    page = folder / REPORT_HTML
    text = page.read_text(encoding="utf-8")
    p = _Refs()
    p.feed(text)
    assert set(SECTIONS) <= p.ids, p.ids
    assert not ({"script", "link", "iframe"} & p.tags)
    assert "http://" not in text and "https://" not in text and "@import" not in text and "url(" not in text
    pngs = [r for r in p.refs if r.endswith(".png")]
    assert {"views.png", "consistency.png", "outliers.png"} <= set(pngs)
    for s in range(n_stacks):
        assert {f"stack{s}_slices.png", f"stack{s}_reslice.png", f"stack{s}_motion.png"} <= set(pngs)
    for ref in p.refs:
        assert "/" not in ref and ":" not in ref, ref  # relative, beside the page
        assert (folder / ref).is_file(), ref
    for ref in pngs:
        with Image.open(folder / ref) as im:
            im.verify()
        img = matplotlib.image.imread(folder / ref)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert float(img[..., :3].std()) > 0.01, f"{ref} is blank"
    return text


def test_reconstruct_report_is_complete(recon):
    text = check_page(recon / "report")
    for name in ("stack_00.nii.gz", "stack_01.nii.gz", "stack_02.nii.gz", "recon.nii.gz"):
        assert name in text
    for words in ("SSIM", "PSNR", "NCC", "rotation", "translation", "excluded"):
        assert words in text
    record = json.loads((recon / "report" / REPORT_DATA).read_text())
    transforms = json.loads((recon / "transforms.json").read_text())
    assert record == transforms
    detail = record["slice_consistency_detail"]
    assert [len(x) for x in detail["before"]["per_slice_ncc"]] == [len(st["slices"]) for st in record["stacks"]]
    assert Path(record["output"]).is_absolute() and Path(record["output"]).name == "recon.nii.gz"


def test_report_command_rebuilds_from_a_reconstruction_folder(recon, tmp_path, capsys):
    # the --output-transforms folder, with the simulated stacks it recorded
    assert main(["report", str(recon), "--output", str(tmp_path / "a"), "--device", "cpu"]) == 0
    check_page(tmp_path / "a")
    assert "read from" in (tmp_path / "a" / REPORT_HTML).read_text()
    # the transforms folder without the simulated stacks: slices simulated again from the volume
    bare = tmp_path / "bare"
    bare.mkdir()
    rec = json.loads((recon / "transforms.json").read_text())
    rec["output_simulated"] = None
    (bare / "transforms.json").write_text(json.dumps(rec))
    assert main(["report", str(bare), "--device", "cpu"]) == 0
    assert "simulated again" in check_page(bare / "report")
    assert capsys.readouterr().out.count("wrote report") == 2


def _summary_rows(text: str) -> list[str]:
    """The summary section's table rows, without the page's time stamp."""
    summary = text[text.index('id="summary"'):text.index('id="volume"')]
    return re.findall(r"<tr>.*?</tr>", summary, flags=re.S)


def test_report_rebuilt_from_a_report_folder_recomputes_nothing(recon, tmp_path, capsys, monkeypatch):
    # issue 12 item 11: the page comes from what the run recorded; reloading the stacks,
    # preprocessing them or simulating slices again would be recomputing it, so all are forbidden
    import slice2vol.core.preprocess
    import slice2vol.evaluation.metrics

    def forbidden(*a, **k):
        raise AssertionError("the report recomputed what the run recorded")

    for mod, name in ((slice2vol.io, "load_stacks"), (slice2vol.core.preprocess, "n4_correct"),
                      (slice2vol.core.preprocess, "normalise_intensities"), (slice2vol.evaluation.metrics, "simulate_slices"),
                      (slice2vol.evaluation.metrics, "slice_consistency")):
        monkeypatch.setattr(mod, name, forbidden)
    copy = tmp_path / "copy"
    shutil.copytree(recon / "report", copy)
    for f in copy.glob("*.png"):
        f.unlink()
    assert main(["report", str(copy), "--device", "cpu"]) == 0
    rebuilt = check_page(copy)
    assert _summary_rows(rebuilt) == _summary_rows((recon / "report" / REPORT_HTML).read_text())
    a, b = load_report_arrays(recon / "report" / REPORT_ARRAYS), load_report_arrays(copy / REPORT_ARRAYS)
    assert np.array_equal(a.volume, b.volume) and len(a.stacks) == len(b.stacks) == 3
    for x, y in zip(a.stacks, b.stacks):
        assert np.array_equal(x.acquired, y.acquired) and np.array_equal(x.simulated, y.simulated)
        assert np.array_equal(x.mask, y.mask) and np.array_equal(x.weights, y.weights)


def test_cli_json_and_report_agree_on_counts_and_time(recon):
    out = (recon / "stdout.txt").read_text()
    record = json.loads((recon / "transforms.json").read_text())
    m = re.search(r"reconstructed in ([0-9.]+) s .*?; (\d+) of (\d+) slices with pixels excluded as outliers "
                  r"\((\d+) slices in the stacks\)", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(record["timings_s"]["total_s"], abs=0.051)
    assert record["timings_s"]["total_s"] >= record["timings_s"]["method_s"] + record["timings_s"]["prepare_s"]
    counts = record["slices"]
    assert [int(m.group(i)) for i in (2, 3, 4)] == [counts["excluded"], counts["with_pixels"], counts["total"]]
    weights = [w for st in record["stacks"] for w in st["weights"]] if "weights" in record["stacks"][0] else None
    page = (recon / "report" / REPORT_HTML).read_text()
    assert f"{counts['with_pixels']} (of {counts['total']} in the stacks)" in page
    assert re.search(rf"excluded slices \(weight &lt; 0.5\)</td><td><span[^>]*>{counts['excluded']}</span>", page), page[:3000]
    assert f"total {record['timings_s']['total_s']:.1f} s" in page
    lost = record["signal_loss"]
    n = sum(st["pixels"] for st in lost["stacks"]) if lost["applied"] else None
    want = ("not checked" if not lost["applied"] else "none found" if not n else f"{n} pixels in")
    assert re.search(rf"dark pixels \(signal loss\)</td><td>(<span[^>]*>)?{want}", page), page[:3000]
    noise = record["noise"]
    assert len(noise["per_stack"]) == len(record["stacks"]) and noise["regularisation"] > 0
    assert f"noise (estimated)</td><td>{100 * noise['median']:.1f} % of the mean brain intensity" in page
    assert f"regularisation {noise['regularisation']:.3g}" in page
    assert noise["edge_threshold"] > 0 and f"edge threshold {noise['edge_threshold']:.3g}" in page
    want = "none found" if not record["turns"] else f"{record['turns'][0]['name']}: about"
    assert f"turns of the fetus during a stack</td><td>{want}" in page
    if weights is not None:
        assert sum(w < 0.5 for w in weights) >= counts["excluded"]


def test_report_refuses_what_it_could_only_recompute_differently(recon, tmp_path, capsys):
    bias = tmp_path / "bias"
    bias.mkdir()
    rec = json.loads((recon / "transforms.json").read_text())
    rec["inputs"]["bias_field"] = True
    (bias / "transforms.json").write_text(json.dumps(rec))
    assert "bias field" in _one_error(["report", str(bias)], capsys)
    rec["inputs"]["bias_field"] = False
    rec.pop("intensity_factors")
    (bias / "transforms.json").write_text(json.dumps(rec))
    assert "intensity factors" in _one_error(["report", str(bias)], capsys)
    # damaged or hostile recorded arrays: one line, and pickled objects are never loaded
    for name, payload in (("garbage", b"PK\x03\x04 not a zip"), ("pickled", None)):
        folder = tmp_path / name
        shutil.copytree(recon / "report", folder)
        if payload is None:
            np.savez(folder / REPORT_ARRAYS, meta=np.array([{"title": "x"}], dtype=object))
        else:
            (folder / REPORT_ARRAYS).write_bytes(payload)
        assert "not a slice2vol report record" in _one_error(["report", str(folder)], capsys)


def _one_error(argv, capsys) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("slice2vol: error:"), err
    return lines[0]


def test_report_of_a_bad_folder_is_one_error_line(tmp_path, recon, capsys):
    assert "not a directory" in _one_error(["report", str(tmp_path / "missing")], capsys)
    (tmp_path / "empty").mkdir()
    assert "no reconstruction found" in _one_error(["report", str(tmp_path / "empty")], capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "transforms.json").write_text("{not json")
    assert "not a reconstruction record" in _one_error(["report", str(bad)], capsys)
    # a record whose stacks have gone
    gone = tmp_path / "gone"
    gone.mkdir()
    rec = json.loads((recon / "transforms.json").read_text())
    rec["inputs"]["stacks"] = [str(tmp_path / "nowhere.nii.gz")] * len(rec["stacks"])
    (gone / "transforms.json").write_text(json.dumps(rec))
    assert "not found" in _one_error(["report", str(gone)], capsys)
    assert not (gone / "report").exists() or not any((gone / "report").iterdir())


def test_report_folder_that_is_a_file_is_refused_before_work(tmp_path, capsys):
    f = tmp_path / "report.txt"
    f.write_text("x")
    argv = ["reconstruct", str(tmp_path / "s.nii.gz"), "-o", str(tmp_path / "r.nii.gz"), "--report", str(f), *FAST]
    assert "--report" in _one_error(argv, capsys)


def test_slice_motion_in_the_slice_frame():
    header = np.tile(np.eye(4), (2, 1, 1))
    header[1, :3, 3] = [5.0, -3.0, 7.0]
    D = params_to_matrix(torch.tensor([[0.0, 0.0, np.radians(10.0), 1.0, 0.0, 2.0],
                                       [np.radians(3.0), 0.0, 0.0, 0.0, -1.5, 0.0]], dtype=torch.float64)).numpy()
    ang, t = slice_motion(header, header @ D)
    np.testing.assert_allclose(ang, [10.0, 3.0], atol=1e-9)
    np.testing.assert_allclose(t, [[1.0, 0.0, 2.0], [0.0, -1.5, 0.0]], atol=1e-9)

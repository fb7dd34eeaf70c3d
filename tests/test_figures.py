"""Figures you can compare: one symmetric colour scale, equal curves that stay visible, PNG + SVG + PDF."""

import math
from pathlib import Path

import numpy as np
import pytest

from gain_cli.reporting import figures


@pytest.fixture()
def drawn(monkeypatch):
    """The matplotlib figures the reports save, by file name (the real files are still written)."""
    seen: dict[str, object] = {}
    real = figures.save_figure

    def spy(fig, path, *args, **kwargs):
        seen[Path(path).name] = fig
        return real(fig, path, *args, **kwargs)

    monkeypatch.setattr(figures, "save_figure", spy)
    return seen


def test_symmetric_limits_over_several_matrices():
    a = np.array([[0.1, -0.3], [np.nan, 0.2]])
    b = np.array([[np.inf, 0.05], [-0.88, 0.0]])     # non-finite values do not set the scale
    assert figures.symmetric_limits([a]) == pytest.approx((-30.0, 30.0))
    assert figures.symmetric_limits([a, b]) == pytest.approx((-88.0, 88.0))
    assert figures.symmetric_limits([b], scale=1.0) == pytest.approx((-0.88, 0.88))
    assert figures.symmetric_limits([]) == (-1.0, 1.0)
    assert figures.symmetric_limits([np.zeros((2, 2)), np.full((1, 1), np.nan)]) == (-1.0, 1.0)


def test_heatmap_colour_limits_own_or_shared(tmp_path, drawn):
    rel = np.array([[-0.57, 0.2], [0.1, 0.3]])
    figures.relative_change_heatmap(rel, ["1", "2"], ["a", "b"], tmp_path / "own.png")
    figures.relative_change_heatmap(rel, ["1", "2"], ["a", "b"], tmp_path / "shared.png", vmax=88.0)
    own, shared = (drawn[n].axes[0].images[0].norm for n in ("own.png", "shared.png"))
    assert (own.vmin, own.vcenter, own.vmax) == pytest.approx((-57.0, 0.0, 57.0))
    assert (shared.vmin, shared.vcenter, shared.vmax) == pytest.approx((-88.0, 0.0, 88.0))


def test_every_figure_also_as_svg_and_pdf(tmp_path):
    p = figures.harness_curve({"a": [0.5, 0.6]}, tmp_path / "c.png")
    assert p == tmp_path / "c.png" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:500]
    assert (tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"
    assert not list(tmp_path.glob(".*.tmp"))
    # the same figure twice: the same bytes (no dates, fixed ids), so a re-made report diffs cleanly
    svg, pdf = (tmp_path / "c.svg").read_bytes(), (tmp_path / "c.pdf").read_bytes()
    figures.harness_curve({"a": [0.5, 0.6]}, tmp_path / "c.png")
    assert (tmp_path / "c.svg").read_bytes() == svg and (tmp_path / "c.pdf").read_bytes() == pdf
    # formats: only what is asked for, and always the path given (the one the Markdown embeds)
    figures.interval_bars({"m": {"x": (1.0, 0.5, 1.5)}}, tmp_path / "only.png", "y", formats=("png",))
    figures.interval_bars({"m": {"x": (1.0, 0.5, 1.5)}}, tmp_path / "pdf.png", "y", formats=("pdf",))
    assert sorted(p.name for p in tmp_path.glob("only.*")) == ["only.png"]
    assert sorted(p.name for p in tmp_path.glob("pdf.*")) == ["pdf.pdf", "pdf.png"]


def test_curve_styles_keep_equal_curves_visible():
    styles = figures.curve_styles({"gain_ffn": [0.7, 0.7, 0.69], "lora": [0.7, 0.62, 0.6],
                                   "ia3": [0.7, 0.7, 0.69], "nan_a": [0.5, math.nan], "nan_b": [0.5, math.nan]})
    assert [s["label"] for s in styles] == ["gain_ffn", "lora", "ia3 (identical to gain_ffn)", "nan_a",
                                            "nan_b (identical to nan_a)"]
    assert len({(s["marker"], s["linestyle"]) for s in styles}) == len(styles)   # no two drawn alike
    widths = [s["linewidth"] for s in styles]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[2]     # later ones thinner, on top
    assert [s["zorder"] for s in styles] == sorted(s["zorder"] for s in styles)
    # the same values over a different number of stages are not "identical"
    assert figures.curve_styles({"a": [0.5, 0.5], "b": [0.5, 0.5, 0.5]})[1]["label"] == "b"


def test_identical_curves_in_the_figure(tmp_path, drawn):
    figures.harness_curve({"gain_ffn": [0.7, 0.65], "lora": [0.7, 0.65]}, tmp_path / "boolq_curve.png")
    ax = drawn["boolq_curve.png"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["gain_ffn", "lora (identical to gain_ffn)"]
    first, second = ax.get_lines()
    assert first.get_linestyle() != second.get_linestyle() and first.get_marker() != second.get_marker()
    assert first.get_linewidth() > second.get_linewidth() and first.get_markersize() > second.get_markersize()

"""Plots (PNG bytes) and the HTML/Markdown report pages built from them."""

from __future__ import annotations

import base64
import io
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import matplotlib.image as mpimg
import numpy as np
import pytest

from kubetrain.report import html as report
from kubetrain.report import plots
from kubetrain.report.html import Image, Section, Table

EVIL = "<script>alert(1)</script>"
STAMP = "2025-01-02T03:04:05+00:00"


# --------------------------------------------------------------------------- data


def _history(n=12):
    return [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "val_loss": 1.2 / e + 0.02 * e,
            "val_accuracy": 0.5 + 0.04 * e,
            "lr": 0.1 * 0.5 ** (e // 4),
        }
        for e in range(1, n + 1)
    ]


def _trials():
    rows = []
    for n in range(8):
        pruned = n in (3, 5)
        curve = [0.5 + 0.05 * k + 0.01 * n for k in range(2 if pruned else 6)]
        rows.append(
            {
                "number": n,
                "state": "PRUNED" if pruned else "COMPLETE",
                "value": None if pruned else curve[-1],
                "params": {"lr": 0.01 * (n + 1)},
                "intermediate": curve,
            }
        )
    rows.append({"number": 8, "state": "FAIL", "value": None, "params": {}, "intermediate": []})
    return rows


def _roc():
    grid = np.linspace(0, 1, 11)
    return {
        name: {"fpr": grid.tolist(), "tpr": (grid**p).tolist(), "auc": 1 / (1 + p)}
        for name, p in [("cat", 0.2), ("dog", 0.4), ("micro", 0.3)]
    }


def _variants():
    return [
        {
            "name": "fp32",
            "bytes": 400_000,
            "gzip_bytes": 370_000,
            "accuracy": 0.95,
            "cpu_latency_ms": 2.0,
            "chosen": False,
        },
        {
            "name": "int8",
            "bytes": 100_000,
            "gzip_bytes": 80_000,
            "accuracy": 0.945,
            "cpu_latency_ms": 1.1,
            "chosen": True,
        },
        {
            "name": "pruned",
            "bytes": 100_000,
            "gzip_bytes": 40_000,
            "accuracy": 0.90,
            "cpu_latency_ms": None,
            "chosen": False,
        },
    ]


def _decode(png: bytes) -> np.ndarray:
    assert isinstance(png, bytes)
    assert png.startswith(plots.PNG_MAGIC)
    return mpimg.imread(io.BytesIO(png), format="png")


def _ink(pixels: np.ndarray) -> float:
    """Fraction of pixels that are not (nearly) white."""
    return float((pixels[..., :3].min(axis=-1) < 0.9).mean())


# Each plot with realistic data, and its expected (height, width) in pixels.
NORMAL = {
    "class_balance": (lambda: plots.class_balance({"a": 10, "b": 3, "c": 7}), (350, 500)),
    "class_balance_compare": (
        lambda: plots.class_balance_compare(
            {"a": 10, "b": 3}, {"a": 10, "b": 10}, labels=("raw", "balanced")
        ),
        (350, 500),
    ),
    "learning_curves": (lambda: plots.learning_curves(_history()), (350, 900)),
    "tuning_trials": (
        lambda: plots.tuning_trials(_trials(), "val_accuracy", "maximize"),
        (350, 900),
    ),
    "confusion_matrix": (lambda: plots.confusion_matrix([[5, 1], [2, 7]], ["neg", "pos"]), None),
    "roc_curves": (lambda: plots.roc_curves(_roc()), (350, 500)),
    "compression_tradeoff": (
        lambda: plots.compression_tradeoff(_variants(), 0.95, 0.01),
        (350, 500),
    ),
}


@pytest.mark.parametrize("name", sorted(NORMAL))
def test_plot_is_a_png_with_the_expected_size_and_content(name):
    make, size = NORMAL[name]
    pixels = _decode(make())
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    if size is not None:
        assert pixels.shape[:2] == size
    else:
        assert 300 <= pixels.shape[0] <= 1000 and 300 <= pixels.shape[1] <= 1100
    assert _ink(pixels) > 0.04  # bars, lines, heatmap: clearly more than a title


def test_empty_input_renders_a_mostly_blank_no_data_figure():
    for png in (
        plots.class_balance({}),
        plots.class_balance_compare({}, {}),
        plots.learning_curves([]),
        plots.tuning_trials([], "loss", "minimize"),
        plots.confusion_matrix([], []),
        plots.roc_curves({}),
        plots.compression_tradeoff([], 0.9, 0.01),
    ):
        pixels = _decode(png)
        assert pixels.shape[:2] == (350, 500)
        assert 0 < _ink(pixels) < 0.02  # a title and "no data", nothing else


NAN = float("nan")
EDGE_CASES = {
    "single class": lambda: plots.class_balance({"only": 4}),
    "zero and None counts": lambda: plots.class_balance({"a": 0, "b": None, "c": NAN}),
    # an even number of $ would make matplotlib parse (and here fail on) math text
    "dollar names": lambda: plots.class_balance(
        {"$x": 1, "a$_$b": 2, "$\\bad{$": 3}, title="$^$ cost"
    ),
    "many classes": lambda: plots.class_balance({f"c{i}": i for i in range(120)}),
    "compare disjoint keys": lambda: plots.class_balance_compare({"a": 1}, {"b": 2}),
    "history one epoch": lambda: plots.learning_curves([{"epoch": 1, "train_loss": 0.5}]),
    "history all None": lambda: plots.learning_curves(
        [{"epoch": 1, "train_loss": None, "val_loss": None, "val_accuracy": None}]
    ),
    "history NaN, no epochs": lambda: plots.learning_curves(
        [
            {"train_loss": NAN, "val_loss": 1.0, "val_accuracy": NAN},
            {"train_loss": 0.4, "val_loss": math.inf, "val_accuracy": 0.7, "lr": "bad"},
        ]
    ),
    "trials all failed": lambda: plots.tuning_trials(
        [{"number": 0, "state": "FAIL", "value": None}], "loss", "minimize"
    ),
    "one complete trial": lambda: plots.tuning_trials(
        [{"number": 0, "state": "COMPLETE", "value": 0.3, "intermediate": [NAN, 0.3]}],
        "loss",
        "minimize",
    ),
    "trials missing fields": lambda: plots.tuning_trials([{}, {"value": 1}], "x", "max"),
    "1x1 matrix": lambda: plots.confusion_matrix([[3]], ["only"]),
    "zero row matrix": lambda: plots.confusion_matrix([[0, 0], [1, 2]], ["a", "b"]),
    "names shorter than matrix": lambda: plots.confusion_matrix([[1, 0, 0]] * 3, ["a"]),
    "ragged matrix": lambda: plots.confusion_matrix([[1, 2], [3]], ["a", "b"]),
    "25-class matrix": lambda: plots.confusion_matrix(
        np.eye(25, dtype=int).tolist(), [f"k{i}" for i in range(25)], False
    ),
    "roc missing auc and NaN": lambda: plots.roc_curves(
        {"a": {"fpr": [0, NAN, 1], "tpr": [0, 0.5, 1]}, "b": {"fpr": [], "tpr": []}}
    ),
    "roc 15 classes": lambda: plots.roc_curves(
        {f"c{i}": {"fpr": [0, 1], "tpr": [0, 1], "auc": 0.5} for i in range(15)}
        | {"micro": {"fpr": [0, 0.1, 1], "tpr": [0, 0.9, 1], "auc": 0.9}}
    ),
    "one variant, no baseline": lambda: plots.compression_tradeoff(
        [{"name": "only", "bytes": 1000, "accuracy": 0.5}], None, None
    ),
    "variant without accuracy": lambda: plots.compression_tradeoff(
        [{"name": "x", "gzip_bytes": 10, "accuracy": None}], 0.9, 0.01
    ),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_still_render(case):
    pixels = _decode(EDGE_CASES[case]())
    assert min(pixels.shape[:2]) >= 300


def test_plots_are_deterministic_and_thread_safe():
    calls = [NORMAL[name][0] for name in sorted(NORMAL)]
    sequential = [make() for make in calls]
    assert [make() for make in calls[:2]] == sequential[:2]  # no timestamp in the PNG
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda make: make(), calls))
    assert parallel == sequential


def test_confusion_matrix_normalization_changes_the_colors():
    matrix = [[90, 10], [1, 1]]  # row sums differ a lot: raw counts and row fractions disagree
    raw = _decode(plots.confusion_matrix(matrix, ["a", "b"], normalize=False))
    norm = _decode(plots.confusion_matrix(matrix, ["a", "b"], normalize=True))
    assert raw.shape == norm.shape
    assert np.abs(raw - norm).mean() > 0.005


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "value, text",
    [
        (0.123456789, "0.1235"),
        (12345.678, "1.235e+04"),
        (2.0, "2"),
        (np.float32(0.5), "0.5"),
        (np.int64(1234567), "1234567"),
        (42, "42"),
        (True, "true"),
        (np.bool_(False), "false"),
        (None, ""),
        (float("nan"), "nan"),
        (float("-inf"), "-inf"),
        ({"lr": 0.000123456, "batch": 64}, "lr=0.0001235, batch=64"),
        ([0.5, 1 / 3], "[0.5, 0.3333]"),
        (list(range(10)), "[0, 1, 2, 3, \u2026, 8, 9] (10 values)"),
        ("text", "text"),
    ],
)
def test_format_value(value, text):
    assert report.format_value(value) == text


# --------------------------------------------------------------------------- HTML


def _images_in(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_html_page_embeds_images_as_data_uris_and_is_self_contained():
    a = plots.class_balance({"a": 1, "b": 2})
    b = plots.learning_curves(_history(4))
    page = report.html_page(
        "Run",
        [
            Section("Data", images=[(a, "balance")]),
            {"title": "Train", "images": [Image(b, "curves"), {"png": a, "caption": "again"}]},
        ],
        generated_at=STAMP,
    )
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert _images_in(page) == [a, b, a]
    # nothing to fetch: every src is a data: URI, no scripts, links or remote URLs
    assert re.findall(r'src="(?!data:image/png;base64,)', page) == []
    lowered = page.lower()
    for needle in ("<script", "<link", "http://", "https://", "@import", "url("):
        assert needle not in lowered, needle
    assert "<style>" in page and "Content-Security-Policy" in page
    assert f'<time datetime="{STAMP}">' in page
    assert "<figcaption>balance</figcaption>" in page


def test_user_text_is_escaped_everywhere():
    png = plots.class_balance({EVIL: 3})
    page = report.html_page(
        EVIL,
        [
            Section(
                title=EVIL,
                text=f"class {EVIL} is **rare**",
                facts={EVIL: EVIL},
                images=[(png, 'x" onerror="alert(1)')],
                tables=[[{EVIL: EVIL, "n": 1}], Table([{"c": 1}], caption=EVIL)],
            ),
            Section("b"),
            Section("c"),
            Section("d"),
        ],
        subtitle=EVIL,
        generated_at=STAMP,
    )
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;") >= 9  # title x3 (head, h1, toc), subtitle, text, ...
    assert 'onerror="' not in page
    assert 'alt="x&quot; onerror=&quot;alert(1)"' in page
    assert "<strong>rare</strong>" in page  # the intended markup still works


def test_markdownish_text_becomes_paragraphs_lists_and_code():
    html_text = report.html_page(
        "t",
        [Section("s", text="First **bold** line\ncontinues.\n\n- one `x<y`\n- two\n\n<b>raw</b>")],
        generated_at=STAMP,
    )
    assert "<p>First <strong>bold</strong> line continues.</p>" in html_text
    assert "<ul><li>one <code>x&lt;y</code></li><li>two</li></ul>" in html_text
    assert "<p>&lt;b&gt;raw&lt;/b&gt;</p>" in html_text


def test_html_table_headers_cells_and_formatting():
    rows = [{"name": "a", "acc": 0.987654321}, {"name": "b", "loss": 1 / 3, "acc": None}]
    table = report.html_table(rows, caption="scores")
    headers = re.findall(r"<th>(.*?)</th>", table)
    assert headers == ["name", "acc", "loss"]  # union of keys, first-seen order
    body = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in body]
    assert cells == [["a", "0.9877", ""], ["b", "", "0.3333"]]
    assert '<td class="num">0.9877</td>' in table and "<td>a</td>" in table
    assert "scores" in table
    assert "no rows" in report.html_table([])
    assert re.findall(r"<th>(.*?)</th>", report.html_table(rows, columns=["acc"])) == ["acc"]


def test_table_of_contents_only_for_long_reports():
    short = report.html_page("t", [Section(str(i)) for i in range(3)], generated_at=STAMP)
    long = report.html_page("t", [Section(str(i)) for i in range(4)], generated_at=STAMP)
    assert 'class="toc"' not in short
    assert long.count('<li><a href="#s') == 4 and 'id="s4"' in long


def test_sections_as_dicts_render_like_dataclasses():
    png = plots.class_balance({"a": 1})
    rows = [{"k": 1.5}]
    as_obj = report.html_page(
        "t",
        [
            Section(
                "s",
                text="hi",
                facts={"n": 2},
                tables=[Table(rows, "cap")],
                images=[Image(png, "c")],
            )
        ],
        generated_at=STAMP,
    )
    as_dict = report.html_page(
        "t",
        [
            {
                "title": "s",
                "text": "hi",
                "facts": {"n": 2},
                "tables": [{"rows": rows, "caption": "cap"}],
                "images": [(png, "c")],
            }
        ],
        generated_at=STAMP,
    )
    assert as_obj == as_dict


def test_default_timestamp_is_now_in_utc():
    page = report.html_page("t", [])
    stamp = re.search(r'<time datetime="([^"]+)">', page).group(1)
    when = datetime.fromisoformat(stamp)
    assert when.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60


def test_non_image_bytes_are_rejected():
    with pytest.raises(ValueError, match="PNG or JPEG"):
        report.html_page("t", [Section("s", images=[b"GIF89a..."])])


# --------------------------------------------------------------------------- Markdown


def _md_cells(line: str) -> list[str]:
    # split on pipes that are not escaped, drop the outer empty cells
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_markdown_table_header_alignment_rows_and_escaping():
    rows = [
        {"class": "a|b", "n": 3, "acc": 0.123456},
        {"class": "x\ny_z", "n": 4, "acc": None},
        {"class": EVIL, "n": 5},
    ]
    lines = report.markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert _md_cells(lines[0]) == ["class", "n", "acc"]
    assert _md_cells(lines[1]) == ["---", "---:", "---:"]  # numbers right-aligned
    assert _md_cells(lines[2]) == [r"a\|b", "3", "0.1235"]
    assert _md_cells(lines[3]) == [r"x y\_z", "4", ""]
    assert _md_cells(lines[4])[0] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert report.markdown_table([]) == "_no rows_"


def test_markdown_page_has_text_and_tables_but_no_images():
    png = plots.class_balance({"a": 1})
    page = report.markdown_page(
        "Run <1>",
        [
            Section(
                "Data",
                text="Two **classes**.",
                facts={"accuracy": 0.91234},
                tables=[Table([{"c": "a", "n": 1}], caption="counts")],
                images=[(png, "balance")],
            ),
        ],
        subtitle="demo",
        generated_at=STAMP,
    )
    assert page.startswith("# Run &lt;1&gt;\n")
    assert "## Data" in page and "Two **classes**." in page and "_demo_" in page
    assert "| accuracy | 0.9123 |" in page
    assert "**counts**\n\n| c | n |" in page
    assert "1 figure(s) in the HTML report: balance" in page
    assert "base64" not in page and "<img" not in page
    assert STAMP in page


# --------------------------------------------------------------------------- files


def test_write_html_and_markdown_atomically(tmp_path):
    sections = [Section("s", tables=[[{"a": 1}]], images=[plots.class_balance({"a": 1})])]
    target = tmp_path / "out" / "report.html"
    assert report.write_html(target, "t", sections, generated_at=STAMP) == target
    assert target.read_text(encoding="utf-8") == report.html_page("t", sections, generated_at=STAMP)
    assert os.stat(target).st_mode & 0o777 == 0o644
    md = report.write_markdown(tmp_path / "out" / "report.md", "t", sections, generated_at=STAMP)
    assert md.read_text(encoding="utf-8") == report.markdown_page("t", sections, generated_at=STAMP)
    # a failed render leaves the previous report in place and no temporary files behind
    before = target.read_bytes()
    with pytest.raises(ValueError):
        report.write_html(target, "t", [Section("bad", images=[b"not an image"])])
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html", "report.md"]

"""The one renderer every report uses: Markdown tables and the offline HTML page built from them."""

from slmshift.platform.render import fmt, html_page, md_table


def test_a_pipe_or_line_break_in_a_cell_keeps_the_table_whole_in_markdown_and_html(tmp_path):
    lines = md_table(["policy", "settings"], [["a|b", "x\ny"], ["plain", fmt(0.5, (0.25, 0.75))]])
    assert lines[2] == "| a\\|b | x y |" and lines[3] == "| plain | 0.500 [0.250, 0.750] |"
    page = html_page("# t\n\n" + "\n".join(lines), {}, "t")
    assert "<td>a|b</td><td>x y</td>" in page and page.count("<tr>") == 3


def test_values_with_and_without_intervals():
    assert fmt(None) == "n/a" and fmt(float("nan")) == "n/a"
    assert fmt(0.412, (0.3, 0.53), pct=True) == "41% [30, 53]"
    assert fmt(0.412, (float("nan"), 0.5)) == "0.412"

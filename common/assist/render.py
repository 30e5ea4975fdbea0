"""Explanations shown to a clinician: in a terminal (ANSI colours, or plain markers) or
as one self-contained HTML page. The attributions come from common/assist/explain.py;
words that support the label are green, words that oppose it red, and an explanation
whose integration error stays large is flagged.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from common.assist import control_table
from common.assist.explain import CHANGE_FLOOR, Explanation


_FLAG_ERROR_ABOVE = 0.1  # renderers flag explanations whose IG error exceeds this
_ANSI_RESET = "\x1b[0m"
_ANSI_SUPPORT = "32"  # green
_ANSI_OPPOSE = "31"  # red
_FAINT_BELOW = 0.1  # |score| / max |score| below this is left uncoloured
_STRONG_FROM = 0.5  # ... from this on, normal intensity; in between, faint

def _strength_scale(expl: Explanation) -> float:
    """What |score| counts as full strength: the record's strongest word, but at least
    CHANGE_FLOOR (probability units), so that a record whose words barely move the
    probability is not painted as if they were decisive."""
    return max(max((abs(w.score) for w in expl.words), default=0.0), CHANGE_FLOOR)


# one visible character for each, so that character offsets stay valid
_CONTROL = control_table("\ufffd", keep="\t\n")


def render_terminal(
    expl: Explanation, label_name: str, *, color: bool = True, top_k: int = 3
) -> str:
    """The text with its words highlighted, then one line naming the top words.

    With ``color``: green supports ``label_name``, red opposes it; faint / normal / bold
    by strength relative to the record's strongest word (or to 0.05 probability, if no
    word moves it that much), bold for the ``top_k`` words. Without: the ``top_k`` words
    are marked ``[[word]]`` (supports) or ``{{word}}`` (opposes), plain text. Words under
    a tenth of that full strength are never highlighted, even among the top ``top_k``;
    the summary line lists the ``top_k`` words with their signed scores either way.
    """
    text = expl.text.translate(_CONTROL)
    top = expl.top(top_k)
    top_spans = {(w.start, w.end) for w in top}
    scale = _strength_scale(expl)

    parts, cursor = [], 0
    for w in expl.words:
        parts.append(text[cursor : w.start])
        word = text[w.start : w.end]
        strength = abs(w.score) / scale
        is_top = (w.start, w.end) in top_spans and strength >= _FAINT_BELOW
        if color:
            if strength < _FAINT_BELOW and not is_top:
                parts.append(word)
            else:
                hue = _ANSI_SUPPORT if w.score > 0 else _ANSI_OPPOSE
                weight = "1" if is_top else ("22" if strength >= _STRONG_FROM else "2")
                parts.append(f"\x1b[{weight};{hue}m{word}{_ANSI_RESET}")
        elif is_top:
            parts.append(f"[[{word}]]" if w.score > 0 else f"{{{{{word}}}}}")
        else:
            parts.append(word)
        cursor = w.end
    parts.append(text[cursor:])

    label = label_name.translate(_CONTROL)
    listed = ", ".join(f"{w.word.translate(_CONTROL)} {w.score:+.3f}" for w in top)
    summary = f"label: {label} (p={expl.probability:.3f}) | top words: {listed or '(none)'}"
    if not color:
        summary += " | [[..]] supports, {{..}} opposes"
    if expl.truncated:
        summary += " | note truncated: later words were not read"
    if expl.approximation_error > _FLAG_ERROR_ABOVE:
        summary += f" | scores approximate (IG error {expl.approximation_error:.0%})"
    return "".join(parts) + "\n" + summary


_HTML_SUPPORT = "22, 163, 74"  # green
_HTML_OPPOSE = "220, 38, 38"  # red
_HTML_MAX_ALPHA = 0.85  # the strongest word; keeps dark text readable on its background

_HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #111; max-width: 60rem; }
.legend { border: 1px solid #ccc; padding: .5rem 1rem; margin-bottom: 1.5rem; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; }
.record { border-top: 1px solid #ddd; padding: .75rem 0; }
.record h2 { font-size: 1rem; margin: 0 0 .5rem 0; }
.text { white-space: pre-wrap; line-height: 1.8; font-family: ui-monospace, monospace; }
.w { border-radius: 3px; padding: 0 1px; }
.meta { color: #555; font-size: .85rem; }
"""


def render_html(
    explanations: Sequence[tuple[Explanation, str]],
    title: str = "Which words drove each prediction",
) -> str:
    """One self-contained HTML page (no scripts, no external resources), a section per record.

    ``explanations`` pairs each Explanation with the display name of its label. Each word
    is a span whose background opacity is proportional to |score|, relative to the
    strongest word *of the same record* (or to 0.05 probability if no word moves it that
    much): green supports the label, red opposes it; hover for the score, label and
    probability. All text is HTML-escaped.
    """
    esc = html.escape  # quote=True: also safe inside attribute values
    sections = []
    for n, (expl, label_name) in enumerate(explanations, start=1):
        label = esc(label_name)
        scale = _strength_scale(expl)
        parts, cursor = [], 0
        for w in expl.words:
            parts.append(esc(expl.text[cursor : w.start]))
            alpha = _HTML_MAX_ALPHA * abs(w.score) / scale
            rgb = _HTML_SUPPORT if w.score > 0 else _HTML_OPPOSE
            verb = "supports" if w.score > 0 else "opposes"
            tip = esc(
                f"score {w.score:+.4f}: {verb} {label_name} (p={expl.probability:.3f})"
            )
            parts.append(
                f'<span class="w" style="background-color: rgba({rgb}, {alpha:.3f})" '
                f'title="{tip}">{esc(expl.text[w.start : w.end])}</span>'
            )
            cursor = w.end
        parts.append(esc(expl.text[cursor:]))
        top = ", ".join(f"{esc(w.word)} ({w.score:+.3f})" for w in expl.top(3)) or "(none)"
        notes = f"IG completeness gap {expl.convergence_delta:+.4f} ({expl.n_steps} steps)"
        if expl.approximation_error > _FLAG_ERROR_ABOVE:
            notes += f"; scores approximate (IG error {expl.approximation_error:.0%})"
        if expl.truncated:
            notes += "; note truncated: later words were not read by the model"
        sections.append(
            f'<section class="record">\n'
            f"<h2>Record {n}: {label} (p = {expl.probability:.3f})</h2>\n"
            f'<div class="text">{"".join(parts)}</div>\n'
            f'<p class="meta">Top words: {top}. {esc(notes)}.</p>\n'
            f"</section>"
        )
    body = "\n".join(sections) if sections else "<p>No records.</p>"
    legend = (
        '<div class="legend">'
        f'<span class="swatch" style="background-color: rgba({_HTML_SUPPORT}, 0.85)"></span> '
        "supports the shown label &nbsp; "
        f'<span class="swatch" style="background-color: rgba({_HTML_OPPOSE}, 0.85)"></span> '
        "opposes it. Colour strength is proportional to the word's |score|, relative to "
        "the strongest word of the same record (or to 0.05, if no word moves the "
        "probability that much); hover a word for its score. Scores are "
        "Integrated Gradients contributions to the label's probability, an aid to review "
        "and not a clinical rationale.</div>"
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{esc(title)}</title>\n<style>{_HTML_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{legend}\n{body}\n</body>\n</html>\n"
    )

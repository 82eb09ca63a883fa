"""Scraped ChatGPT HTML back to markdown, and the page artefacts scraping leaves in the text.

ShareGPT pages hold the ChatGPT answer as rendered HTML: wrapper `div`/`span` tags, code blocks
whose header bar reads "<language>Copy code", a regenerate counter ("1 / 1") glued to the start and
a "Copy N chars / N words" footer. BeautifulSoup rewrites the code blocks into plain
`<pre><code class="language-x">` so markdownify emits fenced blocks with the language; the text
artefacts are removed by anchored patterns.
"""

from __future__ import annotations

import re

# A scraped answer *starts* with its wrapper tag (after a regenerate counter, if any). HTML that
# appears later in a message, or inside a code fence, is content (a user's snippet) and is kept.
_SCRAPED_START = re.compile(r"^\s*(?:\d+\s*/\s*\d+)?\s*<(?:div|p|pre|ol|ul|h[1-6]|table|span|blockquote)\b[^>]*>",
                            re.IGNORECASE)
# "1 / 1" (regenerate counter) glued to the start of a reply
_REGENERATE = re.compile(r"^\s*\d+\s*/\s*\d+(?=[^\s\d./,%])")
_CHARS_WORDS = re.compile(r"Copy\s*\d+\s*chars\s*/\s*\d+\s*words")
# a fence whose first line is the header bar text: "```\npythonCopy code" or "```pythonCopy code"
_FENCE_COPY = re.compile(r"```[ \t]*\n?[ \t]*([\w#+.\-]*)[ \t]*Copy code[ \t]*\n?")
_EMPTY_FENCE = re.compile(r"```[ \t]*\n[ \t]*```\n?")
_LANG_CLASS = re.compile(r"language-([\w#+.\-]+)")


def looks_like_html(text: str) -> bool:
    return _SCRAPED_START.match(text) is not None and "```" not in text


def _code_language(code_tag) -> str:  # noqa: ANN001 - a bs4 Tag
    for cls in code_tag.get("class") or []:
        m = _LANG_CLASS.match(cls)
        if m:
            return m.group(1)
    return ""


def html_to_markdown(text: str) -> str:
    """Markdown for a scraped HTML answer; plain text is returned unchanged apart from artefacts."""
    text = _REGENERATE.sub("", text, count=1)
    if looks_like_html(text):
        from bs4 import BeautifulSoup
        from markdownify import markdownify

        soup = BeautifulSoup(text, "html.parser")
        for pre in soup.find_all("pre"):
            code = pre.find("code")
            if code is None:
                continue
            lang = _code_language(code)
            new_pre = soup.new_tag("pre")
            new_code = soup.new_tag("code")
            if lang:
                new_code["class"] = [f"language-{lang}"]
            new_code.string = code.get_text()
            new_pre.append(new_code)
            pre.replace_with(new_pre)
        for button in soup.find_all("button"):
            button.decompose()
        text = markdownify(
            str(soup),
            heading_style="ATX",
            bullets="-",
            code_language_callback=lambda el: _code_language(el.find("code") or el) or None,
        ).strip()
    return clean_artefacts(text)


def clean_artefacts(text: str) -> str:
    """Remove the page artefacts that survive in already-flattened text."""
    text = _REGENERATE.sub("", text, count=1)
    # Each pattern needs a literal that most messages lack: a substring test skips the regex scan.
    if "Copy" in text:
        text = _CHARS_WORDS.sub("", text)
        if "Copy code" in text:
            text = _FENCE_COPY.sub(lambda m: f"```{m.group(1)}\n", text)
    if "```" in text:
        text = _EMPTY_FENCE.sub("", text)
    return text

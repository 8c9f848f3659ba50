"""report.html: the Markdown rendered (python-markdown) with every image inlined as a data: URI, no
script and no external reference, so the file opens anywhere without a network."""

from __future__ import annotations

import base64

STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "blockquote{color:#8a5a00;border-left:4px solid #e0b050;margin-left:0;padding-left:1em}img{max-width:100%}"
)


def render_html(markdown_text: str, pngs: dict[str, bytes]) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    for name, data in pngs.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        body = body.replace(f'src="{name}"', f'src="{uri}"')
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>ThinkRec evaluation</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )

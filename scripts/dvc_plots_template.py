"""Write the HTML page template `dvc plots show` fills, with Vega inlined, so the plots render offline.

    python scripts/dvc_plots_template.py [--out build/dvc_plots_template.html] [--force]

DVC's own page loads vega, vega-lite and vega-embed from a CDN: opened without a network it is
blank. This page carries the three libraries' minified builds inline instead (fetched once with
`npm pack`, pinned versions, checked against their sha512), and `.dvc/config` points DVC at it
(`plots.html_template`), so `dvc plots show` writes a dvc_plots/index.html that works anywhere,
offline included. `make install` runs this. The majors match DVC's templates (Vega-Lite v5).

Without npm the page falls back to DVC's CDN scripts (a warning says so): `dvc plots show` then
works as stock DVC does, online only.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "build" / "dvc_plots_template.html"

# (npm package, version, file inside the tarball, sha512 of the tarball as npm records it)
LIBRARIES = (
    ("vega", "5.33.1", "package/build/vega.min.js",
     "1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw=="),
    ("vega-lite", "5.23.0", "package/build/vega-lite.min.js",
     "l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA=="),
    ("vega-embed", "6.29.0", "package/build/vega-embed.min.js",
     "PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q=="),
)
# What identifies an offline page of these versions (a version bump rebuilds it; tests look for it).
MARKER = f"<!-- offline plots: {' '.join(f'{name}@{version}' for name, version, _, _ in LIBRARIES)} inlined -->"

# dvc_render fills {plot_divs} (required), {scripts} and {refresh_tag} by plain text replacement.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    %(marker)s
    %(scripts)s
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch(workdir: Path) -> list[tuple[str, str, str]]:
    """(package, version, minified source) of each library, from verified `npm pack` tarballs."""
    specs = [f"{name}@{version}" for name, version, _, _ in LIBRARIES]
    subprocess.run(["npm", "pack", "--silent", *specs], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    sources = []
    for name, version, member, sha512 in LIBRARIES:
        tarball = workdir / f"{name}-{version}.tgz"
        digest = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        if digest != sha512:
            raise SystemExit(f"{tarball.name}: sha512 {digest} is not the pinned {sha512}")
        with tarfile.open(tarball) as archive:
            source = archive.extractfile(member).read().decode("utf-8")
        sources.append((name, version, source))
    return sources


def page(sources: list[tuple[str, str, str]]) -> str:
    scripts = []
    for name, version, source in sources:
        # Inline script text must not close the tag, nor hold a placeholder dvc_render replaces.
        source = source.replace("</script", "<\\/script")
        for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):
            if placeholder in source:
                raise SystemExit(f"{name}@{version} contains {placeholder}: cannot be inlined")
        scripts.append(f"<script>/* {name}@{version} (BSD-3-Clause) */\n{source}\n</script>")
    return PAGE % {"marker": MARKER, "scripts": "\n    ".join(scripts)}


def write(out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"page to write (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if an offline page of these versions is already there")
    args = parser.parse_args(argv)
    if not args.force and args.out.exists() and MARKER in args.out.read_text(encoding="utf-8"):
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        try:
            text = page(fetch(Path(tmp)))
        except (OSError, subprocess.CalledProcessError) as exc:  # no npm, or no registry
            print(f"dvc_plots_template: could not fetch Vega with npm ({exc}); `dvc plots show` will load it "
                  "from the web. Rerun `make install` with npm and its registry at hand for offline plots.",
                  file=sys.stderr)
            write(args.out, PAGE.replace("%(marker)s\n    %(scripts)s", "{scripts}"))
            return 0
    write(args.out, text)
    print(f"dvc_plots_template: wrote {args.out} (vega, vega-lite, vega-embed inlined)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

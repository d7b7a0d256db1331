"""Check the relative links and anchors of the documentation.

  python scripts/check_docs.py [--root DIR]

Reads README.md, CHANGELOG.md and docs/*.md under DIR (default: the
repository holding this script). Every link that is not a URL must name a
file or folder that exists, relative to the file that links (or to DIR when
it starts with '/'); every '#anchor', in the same file or in another
Markdown file, must be the slug of one of that file's headings, made as
GitHub makes it: lowercase, punctuation other than '-' and '_' dropped,
each space a '-', and '-1', '-2', ... appended to repeated slugs.

Prints one line per broken link, 'FILE:LINE: LINK — WHY', and exits 1 if
there is any; otherwise prints one summary line and exits 0. Links inside
code blocks and code spans are not links and are skipped.
"""

import argparse
import dataclasses
import pathlib
import re
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple
import unicodedata
import urllib.parse

REPO = pathlib.Path(__file__).resolve().parent.parent

# Inline links and images: [text](target) or ![alt](target "title").
INLINE_LINK = re.compile(
  r'!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\))?[^\s()]*)(?:\s+["\'(][^)]*)?\s*\)'
)
# Reference definitions: [label]: target
REFERENCE = re.compile(r'^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)')
HEADING = re.compile(r'^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$')
FENCE = re.compile(r'^ {0,3}(`{3,}|~{3,})')
FENCE_END = re.compile(r'^ {0,3}(`{3,}|~{3,})\s*$')
CODE_SPAN = re.compile(r'(`+)(?:(?!\1).)+?\1')
URL_SCHEME = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*:')
# GitHub's line anchors on source files: #L10, #L10-L20.
LINE_ANCHOR = re.compile(r'^L\d+(-L\d+)?$')


@dataclasses.dataclass(frozen=True)
class Broken:
  """A link that does not resolve."""

  file: pathlib.Path
  line: int
  link: str
  why: str

  def format(self, root: pathlib.Path) -> str:
    return f'{_relative(self.file, root)}:{self.line}: {self.link} — {self.why}'


def _relative(path: pathlib.Path, root: pathlib.Path) -> str:
  try:
    return str(path.relative_to(root))
  except ValueError:
    return str(path)


def doc_files(root: pathlib.Path) -> List[pathlib.Path]:
  """README.md, CHANGELOG.md and docs/*.md under `root`, those that exist."""
  files = [root / 'README.md', root / 'CHANGELOG.md']
  files += sorted((root / 'docs').glob('*.md'))
  return [f for f in files if f.is_file()]


def _lines_outside_code(text: str) -> Iterator[Tuple[int, str]]:
  """(line number, line) of the lines outside fenced code blocks."""
  fence: Optional[str] = None
  for number, line in enumerate(text.splitlines(), start=1):
    if fence is None:
      match = FENCE.match(line)
      if match:
        fence = match.group(1)
        continue
      yield number, line
    else:
      closing = FENCE_END.match(line)
      if closing and closing.group(1)[0] == fence[0]:
        if len(closing.group(1)) >= len(fence):
          fence = None


def slug(heading: str) -> str:
  """GitHub's anchor of a heading's text (before de-duplication)."""
  text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # link → text
  text = re.sub(r'<[^>]+>', '', text)  # inline HTML tags
  text = text.strip().lower()
  kept = []
  for char in text:
    category = unicodedata.category(char)
    if char in '-_ ' or category[0] in 'LNM' or category == 'Pc':
      kept.append(char)
  return ''.join(kept).replace(' ', '-')


def anchors(text: str) -> List[str]:
  """The anchors of a Markdown file's headings, in order, de-duplicated."""
  seen: Dict[str, int] = {}
  result = []
  for _, line in _lines_outside_code(text):
    match = HEADING.match(line)
    if not match:
      continue
    base = slug(match.group(2))
    count = seen.get(base, 0)
    seen[base] = count + 1
    result.append(base if count == 0 else f'{base}-{count}')
  return result


def links(text: str) -> Iterator[Tuple[int, str]]:
  """(line number, target) of every link outside code."""
  for number, line in _lines_outside_code(text):
    line = CODE_SPAN.sub('', line)
    for match in INLINE_LINK.finditer(line):
      yield number, match.group(1)
    match = REFERENCE.match(line)
    if match:
      yield number, match.group(1)


class Checker:
  """Resolves links against the files under `root`, caching anchors."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self._anchors: Dict[pathlib.Path, List[str]] = {}

  def anchors_of(self, path: pathlib.Path) -> List[str]:
    if path not in self._anchors:
      self._anchors[path] = anchors(path.read_text(encoding='utf-8'))
    return self._anchors[path]

  def why_broken(self, source: pathlib.Path, target: str) -> Optional[str]:
    """Why `target`, linked from `source`, does not resolve; None if it does."""
    target = target.strip('<>')
    if not target or URL_SCHEME.match(target) or target.startswith('//'):
      return None  # a URL (http:, mailto:, ...): not checked offline
    path_part, _, anchor = target.partition('#')
    path_part = urllib.parse.unquote(path_part.split('?', 1)[0])
    if not path_part:
      path = source
    elif path_part.startswith('/'):
      path = self.root / path_part.lstrip('/')
    else:
      path = source.parent / path_part
    if not path.exists():
      return f'no file {_relative(path.resolve(), self.root)}'
    if not anchor:
      return None
    if path.is_dir() or path.suffix.lower() != '.md':
      if path.is_file() and LINE_ANCHOR.match(anchor):
        return None
      return f'#{anchor}: not a Markdown file, it has no headings'
    anchor = urllib.parse.unquote(anchor).lower()
    if anchor not in self.anchors_of(path):
      return f'no heading with anchor #{anchor} in {_relative(path, self.root)}'
    return None

  def check_file(self, path: pathlib.Path) -> List[Broken]:
    broken = []
    for line, target in links(path.read_text(encoding='utf-8')):
      why = self.why_broken(path, target)
      if why:
        broken.append(Broken(path, line, target, why))
    return broken


def check(root: pathlib.Path) -> Tuple[List[Broken], int]:
  """The broken links of the documentation under `root`, and the files read."""
  root = root.resolve()
  checker = Checker(root)
  files = doc_files(root)
  broken = [b for f in files for b in checker.check_file(f)]
  return broken, len(files)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', type=pathlib.Path, default=REPO)
  args = parser.parse_args(argv)
  root = args.root.resolve()
  broken, files = check(root)
  for b in broken:
    print(b.format(root))
  if broken:
    print(f'check_docs: {len(broken)} broken link(s)', file=sys.stderr)
    return 1
  print(f'check_docs: every relative link and anchor of {files} files resolves')
  return 0


if __name__ == '__main__':
  sys.exit(main())

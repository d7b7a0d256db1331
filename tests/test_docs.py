"""scripts/check_docs.py: the documentation's links resolve, and the checker
reports the ones that do not."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / 'scripts' / 'check_docs.py'


@pytest.fixture(scope='module')
def check_docs():
  spec = importlib.util.spec_from_file_location('check_docs', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_repository_docs_have_no_broken_link(check_docs):
  broken, files = check_docs.check(REPO)
  assert files >= 2  # README.md and docs/*.md at least
  assert [b.format(REPO) for b in broken] == []


@pytest.mark.parametrize(
  'heading, anchor',
  [
    ('Buckets (gs:// paths)', 'buckets-gs-paths'),
    ('`finetune.trainable` and task_files', 'finetunetrainable-and-task_files'),
    ('Small models at 28×28', 'small-models-at-2828'),
    ('See [the docs](docs/x.md)', 'see-the-docs'),
  ],
)
def test_slug_follows_github(check_docs, heading, anchor):
  assert check_docs.slug(heading) == anchor


def test_repeated_headings_get_numbered_anchors(check_docs):
  text = '# Results\n\n## Results\n\n```\n# Results\n```\n\n### Results\n'
  assert check_docs.anchors(text) == ['results', 'results-1', 'results-2']


def run_checker(root: pathlib.Path) -> subprocess.CompletedProcess:
  """`scripts/check_docs.py --root ROOT`, as CI runs it."""
  return subprocess.run(
    [sys.executable, str(SCRIPT), '--root', str(root)],
    capture_output=True,
    text=True,
    check=False,
  )


def test_checker_reports_exactly_the_broken_links(tmp_path):
  docs = tmp_path / 'docs'
  docs.mkdir()
  (docs / 'guide.md').write_text(
    '# Guide\n\n## Two words\n\n## Two words\n', encoding='utf-8'
  )
  (tmp_path / 'README.md').write_text(
    '# Project\n'
    '\n'
    'Good: [guide](docs/guide.md), [section](docs/guide.md#two-words-1),\n'
    '[here](#project), [web](https://example.com/x#y).\n'
    'Broken: [file](docs/missing.md).\n'
    'Broken: [anchor](docs/guide.md#no-such-heading).\n'
    '`[in code](docs/nowhere.md)`\n'
    '\n'
    '```\n'
    '[in a block](docs/nowhere.md)\n'
    '```\n',
    encoding='utf-8',
  )
  result = run_checker(tmp_path)
  assert result.returncode == 1, result.stdout + result.stderr
  assert result.stdout.splitlines() == [
    'README.md:5: docs/missing.md — no file docs/missing.md',
    'README.md:6: docs/guide.md#no-such-heading — no heading with anchor '
    '#no-such-heading in docs/guide.md',
  ]

  (tmp_path / 'README.md').write_text(
    '# Project\n\n[guide](docs/guide.md#guide) and [top](#project).\n',
    encoding='utf-8',
  )
  result = run_checker(tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr

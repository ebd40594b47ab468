"""The manual's cheap commands run as written, and the manual builds.

A ```bash block right after the line `<!-- runs in tests/test_doc_commands.py -->`, in the README or a page
of docs/, is run here from the Markdown itself, command by command, in a scratch directory that holds the
repository's `main.py` and `configs/` (so `runs/...` land there): a renamed flag or config field in such a
block fails this test. The blocks run in the order of `PAGES`, in one directory, so a later block may use a
run an earlier one trained. Only cheap blocks are marked: synthetic data, seconds per command. Together they take
minutes, so they are in the slow set; that a renamed flag fails them, and the build, are in the fast one.
`mkdocs build --strict` is the other half: the site builds, and a page left out of the nav or a broken link
stops it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = (ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md')))
MARKER = '<!-- runs in tests/test_doc_commands.py -->'
BLOCK = re.compile(re.escape(MARKER) + r'\n```bash\n(.*?)```', re.S)
COMMAND_SECONDS = 300  # A command that takes longer is not cheap.


def commands(markdown: str) -> list[str]:
  """The commands of the marked blocks of `markdown`, in order; `\\` continuations joined."""
  lines = (re.sub(r'\\\n\s*', ' ', block).splitlines() for block in BLOCK.findall(markdown))
  return [line.strip() for block in lines for line in block if line.strip() and not line.lstrip().startswith('#')]


def documented_commands() -> list[tuple[str, str]]:
  """(page, command) of every marked block of the README and the manual."""
  return [(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in commands(page.read_text())]


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
  """`command` in bash in `cwd`, with this interpreter's environment first on the PATH."""
  env = {**os.environ, 'PATH': f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}'}
  return subprocess.run(
    ['bash', '-c', command], cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_SECONDS
  )


@pytest.fixture(scope='module')
def scratch(tmp_path_factory) -> Path:
  """A directory where `python main.py --config=configs/...` works as in the repository."""
  directory = tmp_path_factory.mktemp('docs')
  for name in ('main.py', 'configs'):
    (directory / name).symlink_to(ROOT / name)
  return directory


def test_at_least_ten_commands_are_marked():
  assert len(documented_commands()) >= 10, documented_commands()


@pytest.mark.slow  # About three minutes in all: the slow set, which .ci/run runs after the fast one.
@pytest.mark.parametrize('page, command', documented_commands(), ids=lambda value: value[:90])
def test_the_command_runs_as_written(page, command, scratch):
  result = run(command, scratch)
  assert result.returncode == 0, f'{page}: {command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'


def test_a_renamed_flag_fails(scratch):
  """What this test exists for: a command of the manual with a flag that main.py no longer has."""
  markdown = f'{MARKER}\n```bash\npython main.py --config=configs/smoke.py --work_dir=runs/renamed\n```\n'
  [command] = commands(markdown)
  result = run(command, scratch)
  assert result.returncode != 0
  assert "Unknown command line flag 'work_dir'" in result.stderr


def build_manual(site: Path, change: Callable[[Path], object] = lambda docs: None) -> subprocess.CompletedProcess:
  """`mkdocs build --strict` of a copy of the manual (mkdocs.yml, docs/) in `site`, `change(docs)` made first."""
  pytest.importorskip('mkdocs', reason="the manual's builder: pip install -e '.[docs]'")
  shutil.copy(ROOT / 'mkdocs.yml', site)
  shutil.copytree(ROOT / 'docs', site / 'docs')
  change(site / 'docs')
  command = [sys.executable, '-m', 'mkdocs', 'build', '--strict', '-d', str(site / 'site')]
  return subprocess.run(command, cwd=site, capture_output=True, text=True, timeout=120)


def appended(page: str, text: str) -> Callable[[Path], object]:
  return lambda docs: (docs / page).write_text((docs / page).read_text() + text)


def test_the_manual_builds(tmp_path):
  result = build_manual(tmp_path)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'site' / 'development' / 'index.html').is_file()


@pytest.mark.parametrize(
  'change, message',
  [
    (lambda docs: (docs / 'orphan.md').write_text('# Left out of the nav\n'), 'not included in the "nav"'),
    (appended('index.md', '\n[x](nowhere.md)\n'), "contains a link 'nowhere.md', but the target is not found"),
    (appended('index.md', '\n[x](data.md#nowhere)\n'), "does not contain an anchor '#nowhere'"),
  ],
  ids=['page_left_out_of_the_nav', 'broken_link', 'broken_anchor'],
)
def test_the_manual_refuses(change, message, tmp_path):
  result = build_manual(tmp_path, change)
  assert result.returncode != 0
  assert message in result.stderr

"""Every command in the shell blocks of the README and docs/ is run here, shortened, on a tiny
DigitsDet, or is marked in its document with what it needs that this machine lacks.

A mark is a comment that starts with ``needs``. At the end of a command's line it marks that
command; on a line of its own (one of several consecutive comment lines) it marks every command
after it, up to the next comment or the end of the block::

    # needs COCO and 8 GPUs per machine
    python tools/train_net.py --config-file configs/COCO/...
    sbatch ... tools/slurm/train.sbatch ...   # needs SLURM (tests/test_multi_machine.py ...)

An unmarked command must be one of d2kd's (``python tools/NAME.py ...`` or ``python -m
d2kd.MODULE ...``, with any of the checkout's virtualenv pythons) or an ``export``, written out
in full: no placeholder (``CFG``, ``OUT``, ``...``, ``[optional]``). The commands of a document
run in its order, in a scratch folder of its own that looks like a checkout (``configs/``,
``tools/``, ``dev/``, ``projects/``, a tiny ``datasets/digitsdet`` with untrained pre-trained
backbones, untrained teachers where the DigitsDet configs read them), so that a training the
document shows makes what its later commands read. Shortened: trainings run 2 iterations
(``TRAIN_SHORT``), certify 2 seeds and 1 teacher seed, a search 1 trial per stage on a
2-iteration proxy. They are ``long`` tests, run by ``make test-long``; ``make test-upstream``
skips them (``D2KD_DOC_COMMANDS=skip``), as they take minutes and show nothing a build changes
that the rest of its suite does not.
"""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
import torch
from conftest import CONFIGS, REPO, TINY_SPEC, save_untrained_teacher
from detectron2.modeling import build_model

from d2kd.config import load_config
from d2kd.data.digitsdet import generate_digitsdet
from d2kd.model_zoo import pretrained_backbone_path

DOCUMENTS = ["README.md", *sorted(os.path.relpath(p, REPO)
                                  for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
BLOCK = re.compile(r"```(?:bash|sh|shell)\n(?P<body>.*?)```", re.S)
NEEDS = re.compile(r"^#\s*needs\b\s*(?P<what>.*)$")
PYTHONS = ("python", ".venv/bin/python", ".venv-upstream/bin/python")
#: words that stand for something the reader supplies
PLACEHOLDER = re.compile(r"^(CFG|OUT|DIR|IMAGES?|IMG|CONFIG|DISTILL_CFG|SEARCH|STUDENT|G\d|"
                         r"PASSWORD|[SNMT])(\.\w+)?(/|$)|\.\.\.|^\[|<")
TRAIN_SHORT = ["SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.IMS_PER_BATCH", "4",
               "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0",
               "TEST.EVAL_PERIOD", "0"]
LAZY_SHORT = ["train.max_iter=2", "train.checkpointer.period=2", "train.eval_period=0",
              "dataloader.train.total_batch_size=4", "dataloader.train.num_workers=0"]
SEARCH_SHORT = ["DISTILL.DETKDS.SEARCH.PROXY_ITERS", "2",
                "DISTILL.DETKDS.SEARCH.PROXY_WARMUP_ITERS", "1",
                "DISTILL.DETKDS.SEARCH.PROXY_IMS_PER_BATCH", "2",
                "DISTILL.DETKDS.SEARCH.TRAIN_IMAGES", "6", "DISTILL.DETKDS.SEARCH.VAL_IMAGES", "3",
                "DISTILL.DETKDS.SEARCH.INPUTS", "['global']", "DISTILL.DETKDS.SEARCH.PRUNE_AT",
                "0.0", "DISTILL.DETKDS.SEARCH.POPULATION", "2",
                "DISTILL.DETKDS.SEARCH.STAGE2_MAX_GRID", "1",
                "DISTILL.DETKDS.SEARCH.STAGE2_TRIALS", "1", "DATALOADER.NUM_WORKERS", "0"]
#: the untrained teachers the DigitsDet configs read, and the search proxy's starting point
STAND_INS = {"digitsdet/retinanet_R50_teacher": "DigitsDet/retinanet_R50_teacher.yaml",
             "digitsdet/retinanet_R34_teacher": "DigitsDet/retinanet_R34_teacher.yaml",
             "digitsdet/retinanet_R18_student": "DigitsDet/retinanet_R18_student.yaml"}
BACKBONES = {"R18_FPN64": "DigitsDet/retinanet_R18_student.yaml",
             "R34_FPN96": "DigitsDet/retinanet_R34_teacher.yaml",
             "R50_FPN128": "DigitsDet/retinanet_R50_teacher.yaml"}


@dataclass
class DocCommand:
    document: str
    line: int
    text: str  # continuation lines joined, the trailing comment removed
    needs: Optional[str]  # what its mark says it needs (None: unmarked)

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.text}"


def _split_comment(line: str) -> List[str]:
    """``[command, comment]``: the comment starts at a ``#`` after a blank, outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return [line[:i].strip(), line[i:].strip()]
    return [line.strip(), ""]


def document_commands(document: str) -> Iterator[DocCommand]:
    text = Path(REPO, document).read_text()
    for block in BLOCK.finditer(text):
        first_line = text[:block.start("body")].count("\n") + 1
        lines, i, needs, after_comment = block.group("body").split("\n"), 0, None, False
        while i < len(lines):
            start, line = i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            command, comment = _split_comment(line)
            if not command:
                if comment:  # a comment (consecutive lines are one): a mark, or none
                    found = NEEDS.match(comment)
                    mark = found.group("what") if found else None
                    needs = (needs or mark) if after_comment else mark
                after_comment = bool(comment)
                continue
            after_comment = False
            own = NEEDS.match(comment)
            yield DocCommand(document, first_line + start, command,
                             own.group("what") if own else needs)


ALL_COMMANDS = [c for d in DOCUMENTS for c in document_commands(d)]


def split_variables(command: DocCommand) -> Tuple[Dict[str, str], List[str]]:
    """The environment a command sets (``VAR=value`` before it, or ``export VAR=value``) and
    the rest of its words (empty for an ``export``)."""
    words, variables = shlex.split(command.text), {}
    if words[:1] == ["export"]:
        words = words[1:]
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, value = words.pop(0).split("=", 1)
        variables[name] = value
    return variables, words


def why_not_runnable(command: DocCommand) -> Optional[str]:
    """None when the test can run ``command``; else why not."""
    _, words = split_variables(command)
    if not words and command.text.startswith("export "):
        return None
    if not words or words[0] not in PYTHONS:
        return "not a d2kd command"
    if not (words[1:2] == ["-m"] and words[2].startswith("d2kd.")
            or re.match(r"^tools/\w+\.py$", words[1])):
        return "not a d2kd command"
    holes = [w for w in words if PLACEHOLDER.search(w)]
    return f"placeholders {holes}" if holes else None


def test_every_command_in_the_docs_is_run_here_or_marked():
    unrunnable = [f"{c}  ({why_not_runnable(c)})" for c in ALL_COMMANDS
                  if c.needs is None and why_not_runnable(c)]
    assert not unrunnable, (
        "commands that this test cannot run: write them out for DigitsDet, or mark them "
        "`# needs ...` with what they need:\n" + "\n".join(unrunnable))
    assert all(c.needs.strip() for c in ALL_COMMANDS if c.needs is not None), \
        "a `# needs` mark that says nothing"


def test_the_parser_finds_marks_placeholders_and_continuations(tmp_path, monkeypatch):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n```bash\n# needs COCO\npython tools/train_net.py --config-file \\\n"
                   "    configs/COCO/x.yaml   # the big one\nmake test\n# a plain comment\n"
                   "python tools/train_net.py --config-file CFG\n"
                   "sbatch job.sbatch   # needs SLURM\n"
                   "python -m d2kd.apps.collect_env '#not a comment'\n"
                   "# two comment lines, one of them\n# needs a GPU\nmake demo\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    found = list(document_commands("doc.md"))
    assert [(c.line, c.text, c.needs) for c in found] == [
        (4, "python tools/train_net.py --config-file configs/COCO/x.yaml", "COCO"),
        (6, "make test", "COCO"),
        (8, "python tools/train_net.py --config-file CFG", None),
        (9, "sbatch job.sbatch", "SLURM"),
        (10, "python -m d2kd.apps.collect_env '#not a comment'", None),
        (13, "make demo", "a GPU")]
    assert why_not_runnable(found[2]) == "placeholders ['CFG']"
    assert why_not_runnable(found[3]) == "not a d2kd command"
    assert why_not_runnable(found[4]) is None


def shortened(words: List[str]) -> List[str]:
    """A d2kd command's words (after the python), shortened for this test."""
    tool = words[1] if words[0] == "-m" else words[0]
    words = list(words)

    def replace_value(flag: str, value: str) -> None:
        if flag in words:
            words[words.index(flag) + 1] = value

    if tool in ("tools/train_net.py", "d2kd.apps.launch.train_net"):
        return words + (["DATALOADER.NUM_WORKERS", "0"] if "--eval-only" in words
                        else TRAIN_SHORT)
    if tool in ("tools/lazy_train_net.py", "d2kd.apps.launch.lazy_train_net"):
        return words + LAZY_SHORT
    if tool in ("tools/certify.py", "d2kd.apps.certify"):
        replace_value("--seeds", "2")
        replace_value("--teacher-seeds", "1")
        return words + TRAIN_SHORT
    if tool == "tools/search_net.py" and "--compare" not in words:
        replace_value("--trials", "1")
        return words + SEARCH_SHORT
    if tool == "tools/benchmark.py" and words[1] == "accuracy":
        return words + TRAIN_SHORT
    if tool == "tools/benchmark.py" and words[1] == "overhead":
        return words + ["--iters", "2", "--warmup", "1"]
    return words


def _untrained_backbone(config: str, path: str) -> None:
    cfg = load_config(os.path.join(CONFIGS, config), ["MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    model = build_model(cfg).state_dict()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": {k: v for k, v in model.items() if k.startswith("backbone.")}}, path)


@pytest.fixture(scope="module")
def stand_ins(module_tmp_path_factory) -> Dict[str, str]:
    """A tiny DigitsDet with untrained pre-trained backbones (``datasets``), and untrained
    checkpoints where the DigitsDet configs read their teachers and the proxy's start."""
    root = module_tmp_path_factory.mktemp("doc_commands")
    datasets = root / "datasets"
    generate_digitsdet(str(datasets / "digitsdet"), TINY_SPEC, show_progress=False)
    for name, config in BACKBONES.items():
        _untrained_backbone(config, pretrained_backbone_path(name, str(datasets / "digitsdet")))
    runs = {run: save_untrained_teacher(config, root / "runs" / run)
            for run, config in STAND_INS.items()}
    return {"datasets": str(datasets), **runs}


def _checkout(folder: Path, stand_ins: Dict[str, str]) -> None:
    """``folder`` as a checkout: the code and configs linked, the stand-ins in place."""
    for name in ("configs", "tools", "dev", "projects"):
        (folder / name).symlink_to(os.path.join(REPO, name))
    (folder / "datasets").symlink_to(stand_ins["datasets"])
    for run in STAND_INS:
        target = folder / "output" / run
        target.mkdir(parents=True)
        weights = "model_0000199.pth" if run.endswith("student") else "model_final.pth"
        (target / weights).symlink_to(stand_ins[run])


RUN_DOCUMENTS = sorted({c.document for c in ALL_COMMANDS
                        if c.needs is None and not why_not_runnable(c)})


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(os.environ.get("D2KD_DOC_COMMANDS") == "skip",
                    reason="the docs' commands run once per CI, with `make test-long` (`make "
                           "test-upstream` sets D2KD_DOC_COMMANDS=skip)")
@pytest.mark.parametrize("document", RUN_DOCUMENTS)
def test_the_commands_of_a_document_run(document, stand_ins, tmp_path):
    _checkout(tmp_path, stand_ins)
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1",
               MPLBACKEND="Agg")
    for command in [c for c in document_commands(document) if c.needs is None]:
        variables, words = split_variables(command)
        env.update(variables)
        if not words:  # an export
            continue
        if "--config-file" in words and "--eval-only" not in words:
            # a document that trains a stand-in's run itself uses its own
            trained = os.path.basename(words[words.index("--config-file") + 1]).split(".")[0]
            for run in STAND_INS:
                if run.endswith("/" + trained):
                    shutil.rmtree(tmp_path / "output" / run, ignore_errors=True)
        argv = [sys.executable, *shortened(words[1:])]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (f"{command}\nran as: {shlex.join(argv)}\n"
                                      + (done.stdout + done.stderr)[-4000:])

"""One vocabulary across the command line (issue 26, item 5).

The parsers are walked as ``build_parser()`` builds them: every sub-command, every option.
An idea several commands express (the cells, INPUT, OUTPUT, the model folder, the data
source, the device, threads, ...) is declared once, in ``pyro_scvi.cli._common.VOCABULARY``,
and every command must take it from there (``add_idea``), spelled as the table says; an
option string two commands share must mean the same there; no word is spelled two ways;
a replaced spelling keeps working for one release with a note on stderr; and the options
page of the docs lists each command's options and values as its parser has them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from _cli import run_cli_output as _run

from pyro_scvi import _version, datasets
from pyro_scvi.cli import COMMANDS, build_parser
from pyro_scvi.cli._common import DEPRECATED_IN, VOCABULARY

ROOT = Path(__file__).resolve().parents[1]
CLI_PAGE = ROOT / "docs" / "guide" / "cli.md"

#: ideas every command expresses
EVERY_COMMAND = ("input", "seed", "device", "threads", "data_source")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _actions(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


def _idea_of(action: argparse.Action) -> str | None:
    """The vocabulary's idea this action's spelling names, or None."""
    for name, idea in VOCABULARY.items():
        if idea.flags and set(idea.flags) & set(action.option_strings):
            return name
        if not idea.flags and not action.option_strings and action.dest == idea.dest:
            return name
    return None


def _normal(word: str) -> str:
    return re.sub(r"[-_]", "", word.lower())


def test_the_parsers_are_the_commands():
    assert list(_commands()) == list(COMMANDS)


def test_every_idea_is_declared_by_the_vocabulary_and_spelled_as_it_says():
    seen = defaultdict(list)
    for command, p in _commands().items():
        for action in _actions(p):
            name = _idea_of(action)
            marked = getattr(action, "idea", None)
            where = f"{command} {action.option_strings or action.dest}"
            # an option spelled like an idea comes from the table (add_idea), and the reverse
            assert marked == name, f"{where}: declared as {marked!r}, spelled as {name!r}"
            if name is None:
                continue
            idea = VOCABULARY[name]
            seen[name].append(command)
            assert action.option_strings == list(idea.flags), where
            assert action.dest == idea.dest, where
            choices = None if action.choices is None else tuple(action.choices)
            assert choices == idea.choices, where
            metavar = action.metavar
            assert metavar == idea.metavar or (
                idea.metavar is not None and str(metavar).startswith(f"{idea.metavar}.")
            ), f"{where}: metavar {metavar!r}, the vocabulary's {idea.metavar!r}"
    for name in EVERY_COMMAND:
        assert seen[name] == list(COMMANDS), f"{name} is in {seen[name]} only"
    unused = set(VOCABULARY) - set(seen)
    assert not unused, f"ideas no command expresses: {unused}"


def test_an_option_two_commands_share_means_the_same_in_both():
    by_flag = defaultdict(dict)
    by_dest = defaultdict(dict)
    for command, p in _commands().items():
        for action in _actions(p):
            kind = (
                type(action).__name__,
                action.dest,
                None if action.choices is None else tuple(action.choices),
                getattr(action.type, "__name__", action.type),
                action.nargs,
                action.metavar if action.option_strings else None,
            )
            for flag in action.option_strings:
                by_flag[flag][command] = kind
            if action.option_strings:
                by_dest[action.dest][command] = tuple(action.option_strings)
    for flag, kinds in by_flag.items():
        if len(kinds) > 1:
            # metavars of files differ by suffix only (OUTPUT.h5ad, OUTPUT.csv)
            strip = {c: (*k[:-1], str(k[-1]).split(".")[0]) for c, k in kinds.items()}
            assert len(set(strip.values())) == 1, f"{flag} differs between commands: {kinds}"
    for dest, spellings in by_dest.items():
        assert len(set(spellings.values())) == 1, f"{dest} is spelled {spellings}"


def test_no_word_is_spelled_two_ways():
    flags, values = defaultdict(set), defaultdict(set)
    for p in _commands().values():
        for action in _actions(p):
            for flag in action.option_strings:
                flags[_normal(flag)].add(flag)
            for value in action.choices or ():
                values[_normal(value)].add(value)
    assert not {k: v for k, v in flags.items() if len(v) > 1}
    assert not {k: v for k, v in values.items() if len(v) > 1}
    # a deprecated value is not a current value of any command
    for idea in VOCABULARY.values():
        for old, new in idea.deprecated.items():
            assert old not in {w for spelled in values.values() for w in spelled}
            assert new in idea.choices


def test_input_help_names_the_shipped_datasets():
    for command, p in _commands().items():
        (action,) = [a for a in _actions(p) if getattr(a, "idea", None) == "input"]
        for name in re.findall(r"shipped dataset \(([^)]*)\)", action.help):
            assert sorted(name.split(", ")) == sorted(datasets.SHIPPED), command


def _parse(argv: list[str]) -> tuple[argparse.Namespace, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        args = build_parser().parse_args(argv)
    return args, err.getvalue()


_MINIMAL = {
    "fit": ["fit", "in.h5ad", "-o", "out.h5ad"],
    "evaluate": ["evaluate", "model", "in.h5ad"],
    "ppc": ["ppc", "model", "in.h5ad", "-o", "out.nc"],
    "de": ["de", "model", "in.h5ad", "--groupby", "g", "-o", "out.csv"],
    "plot": ["plot", "in.h5ad", "-o", "out.png"],
    "map-query": ["map-query", "reference", "in.h5ad", "-o", "out.h5ad"],
}


def test_minimal_command_lines_parse_quietly():
    assert set(_MINIMAL) == set(COMMANDS)
    for argv in _MINIMAL.values():
        _, err = _parse(argv)
        assert err == ""


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [(n, old, new) for n, i in VOCABULARY.items() for old, new in i.deprecated.items()],
)
def test_a_replaced_value_still_works_for_one_release_with_a_note(name, old, new):
    idea = VOCABULARY[name]
    commands = [c for c, p in _commands().items() if any(a.dest == idea.dest for a in p._actions)]
    assert commands
    for command in commands:
        args, err = _parse([*_MINIMAL[command], idea.flags[0], old])
        assert getattr(args, idea.dest) == new
        (line,) = err.splitlines()
        assert old in line and new in line and "deprecated" in line and DEPRECATED_IN in line
        args, err = _parse([*_MINIMAL[command], idea.flags[0], new])
        assert getattr(args, idea.dest) == new and err == ""
        # hidden: --help lists only the new spelling
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert new in out.getvalue() and old not in out.getvalue().replace(new, "")


def test_deprecated_spellings_go_in_a_later_release():
    version = tuple(int(x) for x in _version.__version__.split(".")[:2])
    assert tuple(int(x) for x in DEPRECATED_IN.split(".")) > version


def test_de_batch_correction_is_a_switch_pair_and_the_old_flag_works():
    args, _ = _parse(_MINIMAL["de"])
    assert args.batch_correction is True
    args, err = _parse([*_MINIMAL["de"], "--no-batch-correction"])
    assert args.batch_correction is False and err == ""


# ------------------------------------------------------------------ the docs' options page
def _options_block() -> dict[str, str]:
    text = CLI_PAGE.read_text()
    section = text.split("## Options", 1)[1]
    block = section.split("```text", 1)[1].split("```", 1)[0]
    commands, current = {}, None
    for line in block.splitlines():
        m = re.match(r"pyro-scvi (\S+)", line)
        if m:
            current = m.group(1)
            commands[current] = ""
        if current:
            commands[current] += " " + line.split("#", 1)[0]
    return commands


def test_the_options_page_lists_every_option_and_its_values():
    listed = _options_block()
    assert list(listed) == list(COMMANDS)
    for command, p in _commands().items():
        text = listed[command]
        for action in _actions(p):
            if not action.option_strings:
                assert action.metavar in text.split(), f"{command}: {action.metavar}"
                continue
            found = [
                m
                for f in action.option_strings
                if (m := re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
            ]
            assert found, f"{command}: {action.option_strings} not listed"
            flag = found[0].group(0)
            if action.choices:
                m = re.search(rf"{flag} ([\w|-]+)", text)
                assert m, f"{command}: {flag}'s values not listed"
                assert set(m.group(1).split("|")) == set(action.choices), f"{command} {flag}"
        for idea in VOCABULARY.values():
            for old in idea.deprecated:
                assert not re.search(rf"(?<![\w-]){old}(?![\w-])", text), f"{command}: {old}"


# ------------------------------------------------------------------ --cells end to end
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from pyro_scvi.datasets import synthetic_zinb

    from pyro_scvi import SCVI

    tmp = tmp_path_factory.mktemp("vocabulary")
    adata = synthetic_zinb(n_cells=80, n_genes=15, n_batches=2, seed=3)
    model = SCVI(adata, batch_key="batch", n_latent=2, n_hidden=8)
    model.train(max_epochs=1, train_size=0.75, batch_size=40, progress_bar=False)
    model.save(tmp / "model")
    adata.write_h5ad(tmp / "cells.h5ad")
    adata[:30].copy().write_h5ad(tmp / "fewer.h5ad")
    return tmp, model


def test_cells_are_the_criticism_apis_cells(saved):
    from pyro_scvi.analysis.criticism import criticize
    from pyro_scvi.errors import InputError

    with pytest.raises(InputError) as err:
        criticize(saved[1], cells="bogus")
    named = re.findall(r"'([\w-]+)'", str(err.value).split(";", 1)[1])
    assert tuple(named) == VOCABULARY["cells"].choices


def test_evaluate_and_ppc_read_cells_alike(saved):
    tmp, model = saved
    base = ["evaluate", tmp / "model", tmp / "cells.h5ad", "--n-samples", "3", "--device", "cpu"]
    counts = {}
    for cells in ("held-out", "training", "all"):
        status, out, err = _run([*base, "--cells", cells])
        assert status == 0 and err == "", err
        result = json.loads(out)
        assert result["cells"] == cells
        counts[cells] = result["n_cells"]
    assert counts == {
        "held-out": len(model.validation_indices),
        "training": len(model.train_indices),
        "all": 80,
    }
    status, out, err = _run([*base, "--cells", "heldout"])
    assert status == 0 and json.loads(out)["cells"] == "held-out"
    assert json.loads(out)["n_cells"] == counts["held-out"] and "deprecated" in err
    # held-out and training name cells of the fitted data: both commands refuse other data
    ppc = ["ppc", tmp / "model", tmp / "fewer.h5ad", "-o", tmp / "p.nc", "--n-samples", "2"]
    for argv in (
        ["evaluate", tmp / "model", tmp / "fewer.h5ad", "--cells", "training"],
        [*ppc, "--cells", "training"],
        ppc,
    ):
        status, out, err = _run([*argv, "--device", "cpu"])
        assert status == 2 and out == ""
        assert "fitted to 80" in err and "--cells all" in err
    assert not (tmp / "p.nc").exists()

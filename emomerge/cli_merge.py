"""CLI commands of the merging core: one command per method, merge, methods, inspect, export-mergekit."""

from __future__ import annotations

import json
import keyword
import os
import sys
import textwrap
from dataclasses import dataclass
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from emomerge._cli_common import (
    TABLE_FORMATS,
    Quiet,
    fail,
    render_table,
    show_progress,
    user_errors,
)

# Options of every merge taking several values after one flag (``--adapters a b c``); the
# per-adapter method parameters (``--density``, ...) join them: see expand_variadic.
VARIADIC = ("--adapters", "--weights")

Adapters = typer.Option(
    ..., "--adapters", help="Adapter folders, in stage order: --adapters A B C."
)
Out = typer.Option(..., "--out", "-o", help="Output folder (written atomically).")
Force = typer.Option(
    False,
    "--force",
    help="Replace an earlier emomerge output (or empty folder) at --out, never an input or anything "
    "else. Only that: adapters of different bases need --allow-different-bases.",
)
AllowBaseMismatch = typer.Option(
    False,
    "--allow-different-bases",
    "--allow-base-mismatch",
    help="Merge adapters recorded on different bases, or fold them into a --base of another model "
    "type (when they are the same weights). --allow-base-mismatch is the older spelling.",
)
AllowLineageMismatch = typer.Option(
    False,
    "--allow-lineage-mismatch",
    help="Use a lineage parent whose sha256 differs from the one its child recorded (recorded in the manifest).",
)


def variadic_options() -> tuple[str, ...]:
    """``--adapters``, ``--weights`` and the flag of every per-adapter method parameter."""
    return VARIADIC + tuple(o.flag for o in _param_options() if o.per_adapter)


def _is_option(token: str) -> bool:
    """``--out``, ``-o``, ``-q``: an option; ``-0.5``, ``-1e-3`` (a negative number) and ``-``
    are values."""
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def expand_variadic(argv: list[str]) -> list[str]:
    """Rewrite ``--adapters a b c`` as ``--adapters a --adapters b --adapters c`` for click.

    A value runs until the next option, long or short (``-o out``); negative numbers stay
    values.
    """
    variadic = variadic_options()
    out: list[str] = []
    current = None
    for token in argv:
        if _is_option(token):
            current = token if token in variadic else None
            out.append(token)
            continue
        if current is not None and out and out[-1] != current:
            out.append(current)
        out.append(token)
    return out


def _parse_rank(value: str | None):
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        fail(f"--rank must be a positive integer or auto, got {value!r}")


def _report(result) -> None:
    """The summary line on stdout; a warning line on stderr when the adapter is far from the merge."""
    typer.echo(result.summary())
    warning = result.warning()
    if warning:
        sys.stderr.write(warning + "\n")


_UNSET = object()


@dataclass(frozen=True)
class _ParamOption:
    """The option of one method parameter name, derived from its declarations in the registry
    (``merging/registry.py``): every method command has it — shown in ``--help`` (with the
    method's default and range) only when the method takes it, still parsed otherwise so the
    merge refuses it by name."""

    name: str  # the recipe name ("lambda")
    flag: str  # "--lambda"
    dest: str  # the Python parameter ("lambda_")
    annotation: Any
    default: Any  # the option's own default (None: not given)
    decls: str | None  # the click declaration when it differs from flag ("--x/--no-x")
    help: str
    per_adapter: bool
    words: tuple[str, ...]  # a textual option (bools and words): the accepted words

    def value(self, given: Any) -> Any:
        """The recipe value of what was given on the command line, or _UNSET."""
        if self.per_adapter:
            return (given[0] if len(given) == 1 else given) if given else _UNSET
        if self.annotation is bool:  # a flag: only ever switches the method's rule on
            return True if given else _UNSET
        if given is None:
            return _UNSET
        if self.words:
            lowered = given.lower()
            if lowered in ("true", "false"):
                return lowered == "true"
            if lowered in self.words:
                return lowered
            fail(
                f"{self.flag} must be {', '.join(self.words[:-1])} or {self.words[-1]}, "
                f"got {given!r}"
            )
        return given


def _param_options() -> list[_ParamOption]:
    """One option per parameter name of the registered methods, in the registry's order, but
    ``weight`` (the ``--weights`` option of every merge)."""
    from emomerge.merging.registry import parameters

    options = []
    for name, decls in parameters().items():
        if name == "weight":
            continue
        first = decls[0]
        choices = [c for d in decls for c in (d.choices or ())]
        texts = tuple(dict.fromkeys(str(c).lower() for c in choices if isinstance(c, str)))
        textual = bool(texts) and any(d.kind is bool for d in decls)
        flag = "--" + name.replace("_", "-")
        decl, words = None, ()
        if any(d.per_adapter for d in decls):
            annotation, default = list[float] | None, None
        elif textual:  # bools and words (rescale: true | false | density)
            annotation, default, words = str | None, None, ("true", "false", *texts)
        elif all(d.kind is bool for d in decls) and not any(d.default for d in decls):
            annotation, default = bool, False  # off unless given: a plain flag
        elif all(d.kind is bool for d in decls):
            annotation, default, decl = bool | None, None, f"{flag}/--no-{flag[2:]}"
        else:
            annotation, default = first.kind | None, None
        options.append(
            _ParamOption(
                name=name,
                flag=flag,
                dest=f"{name}_" if keyword.iskeyword(name) else name,
                annotation=annotation,
                default=default,
                decls=decl,
                help=first.help,
                per_adapter=any(d.per_adapter for d in decls),
                words=words,
            )
        )
    return options


def _method_command(name: str):
    """The command of registered method ``name``: the options every merge has, with the
    method parameters' options (``_param_options``) after ``--weights``."""
    from emomerge.merging.registry import METHODS

    method = METHODS[name]
    param_options = _param_options()

    def fixed(
        adapters: list[Path] = Adapters,
        out: Path = Out,
        weights: list[float] | None = typer.Option(
            None, "--weights", help="One weight per adapter (default 1)."
        ),
        output: str = typer.Option(
            "adapter",
            "--output",
            help="adapter (PEFT LoRA) or full (base with the update folded in).",
        ),
        base: Path | None = typer.Option(
            None, "--base", help="Base model folder (needed for --output full)."
        ),
        rank: str | None = typer.Option(
            None,
            "--rank",
            help="Output LoRA rank N, or auto with --max-error (default: exact for linear methods, largest input rank otherwise).",
        ),
        max_error: float | None = typer.Option(
            None,
            "--max-error",
            help="With --rank auto: per module the smallest rank whose relative Frobenius error is ≤ E, in (0, 1).",
        ),
        refactor: str = typer.Option(
            "projection",
            "--refactor",
            help="How sparse merges are re-factorised to a fixed --rank: projection (onto the adapters' joint column space; fast, no dense update) or best: also compute the truncated SVD of the exact merged block and keep whichever is closer (slower: one dense merge and SVD per module).",
        ),
        seed: int = typer.Option(
            0, "--seed", help="Seed of random methods (DARE, DELLA) and of the randomized SVD."
        ),
        reference: str = typer.Option(
            "base",
            "--reference",
            help="Task vectors relative to the base, or to the previous stage.",
        ),
        dtype: str = typer.Option("float32", "--dtype", help="Compute dtype: float32 or float64."),
        out_dtype: str | None = typer.Option(
            None,
            "--out-dtype",
            help="Stored dtype of the written weights: float32, bfloat16, float16 or float64 (default: the base's own for --output full, float32 factors for adapters).",
        ),
        layout: str | None = typer.Option(
            None,
            "--layout",
            help="Adapter key layout: new, qwen-legacy, llava-legacy (default: the inputs' own, new if mixed).",
        ),
        force: bool = Force,
        allow_base_mismatch: bool = AllowBaseMismatch,
        allow_lineage_mismatch: bool = AllowLineageMismatch,
        allow_pickle: bool = typer.Option(
            False, "--allow-pickle", help="Read adapter_model.bin pickles (they can run code)."
        ),
        quiet: bool = Quiet,
    ) -> None:
        """The options of every merge (the signature the command's is built from)."""

    def option(o: _ParamOption) -> Parameter:
        p = method.param(o.name)
        # escaped: rich would read the brackets as markup and drop the text
        suffix = "" if p is None else escape(f" [method default {p.default}, range {p.range}]")
        info = typer.Option(
            o.default,
            *((o.decls,) if o.decls else (o.flag,)),
            help=o.help + suffix,
            hidden=p is None,
        )
        return Parameter(o.dest, Parameter.KEYWORD_ONLY, default=info, annotation=o.annotation)

    base_params = list(signature(fixed, eval_str=True).parameters.values())
    taken = {p.name for p in base_params}
    clash = [o.dest for o in param_options if o.dest in taken]
    if clash:
        raise ValueError(f"method parameters {clash} clash with the merge commands' own options")
    params = [p.replace(kind=Parameter.KEYWORD_ONLY) for p in base_params]
    params[3:3] = [option(o) for o in param_options]

    def command(**kw):
        from emomerge.merging import merge

        params: dict = {}
        for o in param_options:
            value = o.value(kw[o.dest])
            if value is not _UNSET:
                params[o.name] = value
        adapters, weights = kw["adapters"], kw["weights"]
        if weights and len(weights) != len(adapters):
            fail(f"--weights has {len(weights)} values for {len(adapters)} adapters")
        untrimmed = method.param("density") is not None and "density" not in params
        result = merge(
            name,
            adapters,
            kw["out"],
            weights=weights or None,
            params=params,
            output=kw["output"],
            base=kw["base"],
            rank=_parse_rank(kw["rank"]),
            max_error=kw["max_error"],
            refactor=kw["refactor"],
            seed=kw["seed"],
            reference=kw["reference"],
            dtype=kw["dtype"],
            out_dtype=kw["out_dtype"],
            layout=kw["layout"],
            force=kw["force"],
            allow_pickle=kw["allow_pickle"],
            progress=show_progress(quiet=kw["quiet"]),
            allow_base_mismatch=kw["allow_base_mismatch"],
            allow_lineage_mismatch=kw["allow_lineage_mismatch"],
        )
        _report(result)
        if untrimmed:  # after the merge: a refused merge stays one line
            sys.stderr.write(
                "note: --density not given: 1.0 (mergekit's default), nothing was trimmed\n"
            )

    command.__signature__ = Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = f"{method.summary} ({method.paper})."
    return user_errors(command)


@user_errors
def merge_recipe(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit schema)."),
    out: Path = Out,
    root: Path | None = typer.Option(
        None, "--root", help="Folder relative model paths resolve against (default: current)."
    ),
    output: str | None = typer.Option(
        None, "--output", help="Override the recipe's output: adapter or full."
    ),
    base: Path | None = typer.Option(
        None, "--base", help="Base model folder (overrides base_model for full output)."
    ),
    force: bool = Force,
    allow_base_mismatch: bool = AllowBaseMismatch,
    allow_lineage_mismatch: bool = AllowLineageMismatch,
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Read adapter_model.bin pickles."
    ),
    quiet: bool = Quiet,
) -> None:
    """Run a merge recipe (mergekit's YAML schema) natively."""
    from emomerge.merging.errors import InputError
    from emomerge.merging.recipe import run_recipe

    try:
        result = run_recipe(
            recipe,
            out,
            root=root,
            force=force,
            output=output,
            base=base,
            progress=show_progress(quiet=quiet),
            allow_pickle=allow_pickle,
            allow_base_mismatch=allow_base_mismatch,
            allow_lineage_mismatch=allow_lineage_mismatch,
        )
    except InputError as exc:
        hint = _root_hint(recipe) if root is None else ""
        fail(str(exc).splitlines()[0] + hint)
    _report(result)


def _root_hint(recipe: Path) -> str:
    """When a relative model path of the recipe is missing under the current folder: where to
    point ``--root`` (a folder below holding it, if one is found)."""
    from emomerge.merging.recipe import adapter_path, load_recipe

    try:
        parsed = load_recipe(recipe)
    except Exception:  # noqa: BLE001 - the recipe's own error is already the message
        return ""
    missing = [
        m.model
        for m in parsed.models
        if not Path(m.model.split("+")[-1]).is_absolute()
        and not adapter_path(m.model, parsed.base_model, Path.cwd()).exists()
    ]
    if not missing:
        return ""
    rel = Path(missing[0].split("+")[-1])
    found = next(
        (
            p
            for p in sorted(Path.cwd().glob(f"*/{rel}")) + sorted(Path.cwd().glob(f"*/*/{rel}"))
            if p.is_dir()
        ),
        None,
    )
    where = (
        f" --root {os.path.relpath(found.parents[len(rel.parts) - 1])}"
        if found
        else " --root FOLDER"
    )
    return (
        f" (relative model paths resolve against the current folder; pass{where} "
        f"for the folder they are under)"
    )


def methods(
    fmt: str = typer.Option(
        "table",
        "--format",
        help="table (terminal, cells wrap, links whole), markdown, csv or json.",
    ),
) -> None:
    """List every merge method with its parameters, defaults and paper."""
    from emomerge.merging.registry import METHODS

    def params(m, sep: str) -> str:
        return sep.join(
            f"{p.name}{'[per adapter]' if p.per_adapter else ''} = {p.default} {p.range}"
            for p in m.params
        )

    if fmt == "table" and Console().width < 120:
        # too narrow for five columns with whole links: one block per method
        width = Console().width
        for m in METHODS.values():
            typer.echo(textwrap.fill(f"{m.name} — {m.summary}", width, subsequent_indent="  "))
            typer.echo(f"  paper: {m.paper}\n  mergekit: {m.mergekit or '—'}")
            typer.echo(
                textwrap.fill(
                    params(m, "; "),
                    width,
                    initial_indent="  ",
                    subsequent_indent="    ",
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )
        return
    body = [
        [m.name, m.summary, params(m, "\n" if fmt == "table" else "; "), m.paper, m.mergekit or "—"]
        for m in METHODS.values()
    ]
    render_table(
        "emomerge merge methods",
        ["method", "what it does", "parameters (default, range)", "paper", "mergekit"],
        body,
        fmt,
        keep=("method", "paper"),
        lines=True,
    )


@user_errors
def inspect(
    adapters: list[Path] = typer.Argument(..., help="Adapter folders."),
    reference: str = typer.Option("base", "--reference", help="base or previous."),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object (the whole report; same as --format json)."
    ),
    fmt: str = typer.Option(
        "table",
        "--format",
        help="table (terminal), markdown, csv (one row "
        "per adapter, cosines as columns) or json (the whole report).",
    ),
    allow_base_mismatch: bool = AllowBaseMismatch,
    force: bool = typer.Option(False, "--force", hidden=True),
) -> None:
    """Show each adapter's base, layout, modules, ranks, scales, ΔW norms, lineage (and any
    parent whose sha256 differs from the recorded one), and the pairwise cosine similarity of
    the task vectors. Adapters are named relative to their common folder (in the title)."""
    from emomerge.merging.inspect import inspect_adapters, short_paths

    if force:  # its old meaning (inspect writes nothing) has its own option now
        fail(
            "--force: inspect writes nothing; to read adapters of different bases pass --allow-different-bases"
        )
    if fmt not in TABLE_FORMATS:  # before the adapters are read
        fail(f"--format: expected one of {', '.join(TABLE_FORMATS)}, got '{fmt}'")
    report = inspect_adapters(
        adapters, reference=reference, allow_base_mismatch=allow_base_mismatch
    )
    if as_json or fmt == "json":
        typer.echo(json.dumps(report, indent=2))
        return
    root, names = short_paths([a["path"] for a in report["adapters"]])
    bases = sorted({str(a["base"]) for a in report["adapters"]})
    # one base (the usual case): its folder name; several: what tells them apart
    base_names = dict(
        zip(bases, [Path(b).name or b for b in bases] if len(bases) == 1 else short_paths(bases)[1])
    )
    header = ["#", "adapter", "base", "layout", "modules", "ranks", "scales", "‖τ‖", "lineage"]
    body = []
    for i, (a, name) in enumerate(zip(report["adapters"], names)):
        lin = a["lineage"]
        body.append(
            [
                str(i),
                name,
                base_names[str(a["base"])],
                a["layout"],
                str(a["modules"]),
                ",".join(map(str, a["ranks"])),
                ",".join(f"{s:g}" for s in a["scales"]),
                f"{a['task_vector_norm']:.4g}",
                "—"
                if lin is None
                else f"{lin['mode'] or 'independent'} ← {lin['parent'] or 'base'}"
                + (
                    " [parent changed: sha256 differs]"
                    if lin and lin.get("parent_sha256_ok") is False
                    else ""
                ),
            ]
        )
    title = f"adapters (task vectors relative to the {reference})" + (
        f" in {root}/" if root else ""
    )
    if fmt == "table" and len(bases) == 1:  # one base: named once, in the title
        title += f"; base {base_names[bases[0]]}"
        header.remove("base")
        body = [row[:2] + row[3:] for row in body]
    cos_cells = [[f"{v:+.3f}" for v in row] for row in report["cosine"]]
    if fmt == "table":
        render_table(title, header, body, keep=("#", "adapter"))
    else:  # one table: the cosines of each adapter as its last columns
        render_table(
            title,
            header + [f"cos {i}" for i in range(len(body))],
            [b + c for b, c in zip(body, cos_cells)],
            fmt,
        )
    for m in report["lineage_mismatches"]:
        sys.stderr.write(
            f"warning: {m['parent']}: sha256 differs from the parent_sha256 recorded "
            f"in {m['child']}/emomerge.json (the parent changed after its child was trained)\n"
        )
    if fmt == "table":
        render_table(
            "cosine similarity of task vectors",
            ["", *map(str, range(len(body)))],
            [[str(i), *row] for i, row in enumerate(cos_cells)],
        )
        typer.echo(
            textwrap.fill(
                _rank_line(report["output_rank"]),
                Console().width,
                subsequent_indent="  ",
                break_long_words=False,
            )
        )
    elif fmt == "markdown":
        typer.echo("\n" + _rank_line(report["output_rank"]))
    else:  # csv: the table only; the rank line on stderr
        sys.stderr.write(_rank_line(report["output_rank"]) + "\n")


def _rank_line(ranks: dict) -> str:
    """What rank a merged adapter of these inputs has, and what vLLM then needs."""
    from emomerge.merging.serving import VLLM_DEFAULT_MAX_LORA_RANK

    parts = []
    for key, what in (
        ("exact_linear", "linear / task arithmetic (exact)"),
        ("sparse_default", "sparse methods (default --rank)"),
    ):
        rank, needed = ranks[key], ranks["vllm_max_lora_rank"][key]
        if rank <= VLLM_DEFAULT_MAX_LORA_RANK:
            vllm = "vLLM's default max_lora_rank 16 serves it"
        elif needed is None:
            vllm = "above vLLM's largest --max-lora-rank 512: use --rank"
        else:
            vllm = f"vLLM needs --max-lora-rank {needed}"
        parts.append(f"{what}: rank {rank} ({vllm})")
    return "merged adapter rank: " + "; ".join(parts)


@user_errors
def export_mergekit(
    recipe: Path | None = typer.Argument(
        None, help="Recipe YAML; or give --method and --adapters."
    ),
    base: str = typer.Option(
        ..., "--base", help="Base model (hub id or folder) for base+adapter references."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write the YAML here (default: stdout)."
    ),
    method: str | None = typer.Option(None, "--method", help="Merge method (without a recipe)."),
    adapters: list[Path] | None = typer.Option(
        None, "--adapters", help="Adapter folders (without a recipe)."
    ),
    weights: list[float] | None = typer.Option(
        None, "--weights", help="Without a recipe: one weight per adapter, or one for all."
    ),
    density: list[float] | None = typer.Option(
        None, "--density", help="Without a recipe: fraction kept, one value or one per adapter."
    ),
    root: Path | None = typer.Option(
        None, "--root", help="Folder relative model paths resolve against."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace an earlier export at --out (never an input or another file).",
    ),
) -> None:
    """Write the mergekit YAML of the same merge (base+adapter references)."""
    from emomerge.merging.errors import MergeInputError
    from emomerge.merging.recipe import Recipe, adapter_path, load_recipe
    from emomerge.merging.recipe import export_mergekit as export
    from emomerge.merging.safeout import write_text_output

    if recipe is not None:
        parsed = load_recipe(recipe)
    else:
        if not method or not adapters:
            raise MergeInputError("export-mergekit needs a RECIPE or --method and --adapters")
        models = []
        for i, a in enumerate(adapters):
            p: dict = {}
            if weights:
                p["weight"] = weights[i] if len(weights) > 1 else weights[0]
            if density:
                p["density"] = density[i] if len(density) > 1 else density[0]
            models.append({"model": str(a.resolve()), "parameters": p})
        parsed = Recipe.model_validate({"merge_method": method, "models": models})
    root_dir = (root or Path.cwd()).resolve()
    text = export(parsed, base_model=base, root=root_dir)
    if out is None:
        typer.echo(text, nl=False)
        return
    inputs = [adapter_path(m.model, parsed.base_model, root_dir) for m in parsed.models]
    inputs += [recipe] if recipe is not None else []
    write_text_output(out, text, force=force, inputs=inputs)
    typer.echo(f"wrote {out}")


lineage_app = typer.Typer(
    no_args_is_help=True,
    help="Record or show the lineage (emomerge.json) of stage adapters trained elsewhere.",
)


@lineage_app.command("set")
@user_errors
def lineage_set(
    adapter: Path = typer.Argument(..., help="The adapter folder to record the lineage of."),
    mode: str = typer.Option(
        ...,
        "--mode",
        help="continued (the parent's LoRA kept training) or stacked (the parent folded into the base, a fresh LoRA on top).",
    ),
    parent: Path | None = typer.Option(
        None,
        "--parent",
        help="The parent stage adapter folder (omit for a first stage trained on the base).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace a lineage recorded by training."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Read adapter_model.bin pickles."
    ),
) -> None:
    """Write ADAPTER/emomerge.json: its parent (relative path), the parent's sha256 and the mode,
    as training records them, so --reference previous and stacked chains work for it."""
    from emomerge.merging.lineage_edit import set_lineage

    doc = set_lineage(adapter, mode=mode, parent=parent, force=force, allow_pickle=allow_pickle)
    lin = doc["lineage"]
    typer.echo(
        f"{adapter / 'emomerge.json'}: {lin['mode']} ← {lin['parent'] or 'base'}"
        + (f" (parent sha256 {lin['parent_sha256'][:12]}…)" if lin.get("parent_sha256") else "")
    )


@lineage_app.command("show")
@user_errors
def lineage_show(
    adapter: Path = typer.Argument(..., help="Adapter folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The adapter's lineage up to the base: mode, parent, sha256 check, who recorded it."""
    from emomerge.merging.lineage_edit import show_lineage

    report = show_lineage(adapter)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for link in report["chain"]:
        if link.get("note"):
            typer.echo(f"{link['adapter']}: {link['note']}")
            continue
        sha = {
            True: ", parent sha256 ok",
            False: ", parent sha256 DIFFERS from the recorded one",
            None: "",
        }[link.get("parent_sha256_ok")]
        missing = ", parent not on disk" if link.get("parent_on_disk") is False else ""
        typer.echo(
            f"{link['adapter']}: {link['mode'] or 'independent'} ← {link['parent'] or 'base'}"
            f"{sha}{missing} [recorded by {link['recorded_by']}]"
        )


def register(app: typer.Typer) -> None:
    """Add the merging commands to the emomerge app: one per registered method (at call time,
    so a method registered before ``emomerge.cli.build_app`` is a command)."""
    from emomerge.merging.registry import METHODS

    for name in METHODS:
        app.command(name.replace("_", "-"), help=None)(_method_command(name))
    app.command("merge")(merge_recipe)
    app.command("methods")(methods)
    app.command("inspect")(inspect)
    app.command("export-mergekit")(export_mergekit)

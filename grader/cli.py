"""The ``brewslm`` command: release, run, grade, validate, mistakes, demo, bench, lab.

Errors a user can cause (unknown lesson, missing folder, corrupt notebook) print one line and
exit with status 2, no traceback.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from brewslm_helpers.budget import BUDGETS
from brewslm_helpers.paths import REPO_ROOT, cache_dir

from .lessons import CourseError, find_lesson, lesson_of_filename, select_lessons


def cmd_release(args) -> int:
    from .release import release

    changed = release(select_lessons(args.lessons), check=args.check)
    if args.check:
        if changed:
            print("out of date (run `brewslm release`): " + ", ".join(changed))
            return 1
        print("release notebooks are up to date")
    else:
        print("regenerated: " + (", ".join(changed) if changed else "nothing (already up to date)"))
    return 0


def cmd_doctor(args) -> int:
    from . import doctor

    if args.bench:
        return doctor.bench(args.repeats)
    return doctor.main(use_cache=False)


def cmd_run(args) -> int:
    from . import doctor
    from .run import run_lessons

    lessons = select_lessons(args.lessons)
    doctor.require()
    print(f"executing {len(lessons)} notebook(s) from {args.source}/ at budget {args.budget!r}")
    rows = run_lessons(lessons, args.budget, Path(args.out) if args.out else None, args.source)
    print_run_table(rows)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def print_run_table(rows: list[dict]) -> None:
    print(f"\n{'lesson':<28} {'status':<8} {'seconds':>8}")
    for r in rows:
        print(f"{r['lesson']:<28} {r['status']:<8} {r['seconds']:>8.1f}")
    print(f"{'total':<28} {'':<8} {sum(r['seconds'] for r in rows):>8.1f}")
    if rows:
        print(f"executed notebooks: {Path(rows[0]['output']).parent}")


def cmd_grade(args) -> int:
    from . import doctor
    from .grade import ENVIRONMENT_FAILS, grade_folder, summary_table

    out = Path(args.out) if args.out else cache_dir() / "grading" / Path(args.submissions).stem
    start = time.perf_counter()
    if not Path(args.submissions).exists():
        raise CourseError(f"{args.submissions}: no such folder or zip")
    # a broken set-up is said in one line, then each lesson's own solution decides which lessons
    # can be graded here: a lesson this machine cannot run is "not graded", never students' zeros
    setup_problem = doctor.failure_line(doctor.run_checks())
    if setup_problem:
        print(f"brewslm: warning: {setup_problem}", file=sys.stderr, flush=True)
    results = grade_folder(Path(args.submissions), out, budget=args.budget,
                           feedback=not args.no_feedback, notebook_timeout=args.timeout,
                           jobs=args.jobs, cell_timeout=args.cell_timeout,
                           memory_gib=args.memory, regrade=args.regrade,
                           setup_problem=setup_problem, scheduler=args.scheduler)
    print("\n" + summary_table(results))
    print(f"\ngraded {len(results)} submission(s) in {time.perf_counter() - start:.0f} s "
          f"with --jobs {args.jobs}")
    print(f"\ngradebook: {out / 'gradebook.csv'}\nfeedback:  {out / 'feedback'}")
    broken = sorted({r.lesson for r in results if r.reason.startswith(ENVIRONMENT_FAILS)})
    if broken:
        print(f"brewslm: error: not graded, the course environment fails the solution of: "
              f"{', '.join(broken)} (see the reasons above)", file=sys.stderr)
        return 3
    return 1 if setup_problem else 0


def cmd_validate(args) -> int:
    from . import doctor
    from .course import Course
    from .grade import Submission, check_submission
    from .notebooks import read_notebook

    path = Path(args.notebook)
    lesson = find_lesson(args.lesson) if args.lesson else lesson_of_filename(path.name)
    if lesson is None:
        raise CourseError(f"{path.name}: cannot tell the lesson from the file name; pass --lesson")
    nb = check_submission(Submission("you", lesson, path))
    doctor.require()
    with tempfile.TemporaryDirectory(prefix="brewslm-validate-") as tmp:
        course = Course(Path(tmp) / "course", budget=args.budget)
        course.setup([lesson])
        course.submit("you", lesson, nb)
        print(f"running {path.name} as the grader does (budget {args.budget!r})...", flush=True)
        reason = course.autograde("you", lesson)
        if reason:
            raise CourseError(reason)
        scores = course.scores("you", lesson)
        graded = read_notebook(course.root / "autograded" / "you" / lesson.slug / f"{lesson.slug}.ipynb")
    errors = {}
    for cell in graded.cells:
        gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors[gid] = f"{out['ename']}: {out['evalue']}"[:200]
    outcome = course.last_outcome.get(("you", lesson.slug))
    for gid, why in (outcome.failures.items() if outcome else []):
        if not why.startswith("fails (see") and gid not in errors:
            errors[gid] = why
    for gid, (score, max_score) in sorted(scores["cells"].items()):
        mark = "PASS" if score == max_score else "FAIL"
        print(f"  {mark}  {gid:<32} {score:g}/{max_score:g}  {errors.get(gid, '')}")
    print(f"score: {scores['score']:g}/{scores['max_score']:g}")
    return 0 if scores["score"] == scores["max_score"] else 1


def cmd_mistakes(args) -> int:
    """For lesson authors: which test cells each known mistake fails (one kernel per lesson)."""
    from .notebooks import read_notebook, test_cells
    from .selfcheck import judge_variants, score_variants, should_fail

    bad = 0
    for lesson in select_lessons(args.lessons):
        points = test_cells(read_notebook(lesson.solution))
        print(f"{lesson.slug}: {len(lesson.mistakes)} known mistakes, {len(points)} test cells"
              + (" (the judge)" if args.judge else ""), flush=True)
        check = judge_variants if args.judge else score_variants
        for name, scored in check(lesson, budget=args.budget).items():
            failed = {g for g, s in scored.items() if s < points[g]}
            want = should_fail(lesson, name)
            ok = failed == want
            bad += not ok
            shown = ", ".join(sorted(failed)) or "passes every test"
            print(f"  {'ok ' if ok else 'BAD'}  {name:<36} {shown}"
                  + ("" if ok else f"   (should fail: {', '.join(sorted(want)) or 'none'})"))
    return 1 if bad else 0


def cmd_demo(args) -> int:
    """The main job: grade the sample class of every lesson at ``ci`` budget.

    Grading starts with the environment check, which executes each lesson's solution headless in
    the sandbox and grades it (the first sample student's notebook is that solution, so it is not
    run twice); then the blank and the mistaken notebooks. Exit 0 only when every lesson's
    solution gets full marks here and each sample student gets the marks they should."""
    from .grade import grade_folder, summary_table
    from .sample import SAMPLE_STUDENTS, expected_scores, write_sample_class

    lessons = select_lessons(args.lessons)
    start = time.perf_counter()
    from . import doctor

    doctor.require()
    print(f"grading the sample class of {len(lessons)} lesson(s) at budget 'ci':")
    for name, what in SAMPLE_STUDENTS.items():
        print(f"  {name:<6} {what}")
    work = cache_dir() / "demo"
    sample = write_sample_class(lessons, work / "sample_class")
    # two at a time where there are two cores (each submission's judge runs beside its autograde)
    results = grade_folder(sample, work / "grades", budget="ci", jobs=min(2, os.cpu_count() or 1))
    print("\n" + summary_table(results))
    wrong = []
    for r in results:
        want = expected_scores(r.lesson)[r.student]
        if r.status != "graded" or abs(r.score - want) > 1e-9:
            wrong.append(f"{r.student} {r.lesson}: {r.status}, {r.score:g}/{r.max_score:g} "
                         f"(should be {want:g})")
    print("\n" + ("every sample student got the marks they should" if not wrong else
                  "NOT AS EXPECTED:\n  " + "\n  ".join(wrong)))
    print(f"gradebook: {work / 'grades' / 'gradebook.csv'}  (total {time.perf_counter() - start:.0f} s)")
    return 1 if wrong else 0


def cmd_bench(args) -> int:
    """Run lessons at ``full`` budget and print every "what we measured" table."""
    from brewslm_helpers.report import load_results

    from . import doctor
    from .run import run_lessons

    lessons = select_lessons(args.lessons)
    doctor.require()
    rows = run_lessons(lessons, "full")
    print_run_table(rows)
    for lesson, table in load_results("full").items():
        print(f"\n## {lesson}\n{table.to_string(index=False)}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def cmd_lab(args) -> int:
    return subprocess.call([str(Path(sys.executable).parent / "jupyter"), "lab",
                            str(REPO_ROOT / "notebooks"), *args.extra])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brewslm", description="BrewSLM Academy, Advanced track")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("release", help="regenerate notebooks/ from solutions/ (nbgrader)")
    s.add_argument("lessons", nargs="*", help="lessons (default: all)")
    s.add_argument("--check", action="store_true", help="only report out-of-date notebooks")
    s.set_defaults(func=cmd_release)

    s = sub.add_parser("doctor", help="check that the course can run on this machine (llama.cpp "
                                      "build, model, transformers); one line per component")
    s.add_argument("--bench", action="store_true",
                   help="also time llama.cpp prefill/decode tokens/s (extra buffer types on and off)")
    s.add_argument("--repeats", type=int, default=3, help="benchmark repetitions (with --bench)")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("run", help="execute notebooks headless with papermill")
    s.add_argument("lessons", nargs="*", help="lessons, e.g. 3 or 03_kd_loss (default: all)")
    s.add_argument("--budget", choices=BUDGETS, default="ci")
    s.add_argument("--source", choices=["solutions", "notebooks"], default="solutions")
    s.add_argument("--out", help="folder for executed copies (default: $BREWSLM_CACHE/runs/BUDGET)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("grade", help="autograde a folder or LMS zip of submissions")
    s.add_argument("submissions", help="folder of <student>/<NN_slug>.ipynb, or an LMS zip")
    s.add_argument("--out", help="output folder (default: $BREWSLM_CACHE/grading/NAME)")
    s.add_argument("--budget", choices=BUDGETS, default="ci")
    s.add_argument("--timeout", type=int, default=900, help="seconds per submission (each phase)")
    s.add_argument("--cell-timeout", type=int, default=300, help="seconds per cell")
    s.add_argument("--memory", type=float, default=8, help="GiB of memory per grading process")
    s.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="grade on Dask distributed: 'local' (a local cluster of --jobs workers) or "
                        "a scheduler address such as tcp://host:8786 (see the README)")
    s.add_argument("--jobs", "-j", type=int, default=1,
                   help="submissions graded in parallel (each uses about one core and 2-3 GiB)")
    s.add_argument("--regrade", action="store_true",
                   help="grade every submission again, even those unchanged since the last run")
    s.add_argument("--no-feedback", action="store_true", help="skip the feedback HTML")
    s.set_defaults(func=cmd_grade)

    s = sub.add_parser("validate", help="check your own notebook the way the grader will")
    s.add_argument("notebook")
    s.add_argument("--lesson", help="lesson, if the file name does not say")
    s.add_argument("--budget", choices=BUDGETS, default="ci")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("mistakes", help="for authors: check that each known mistake fails exactly "
                                        "the test cells it names")
    s.add_argument("lessons", nargs="*", help="lessons (default: all)")
    s.add_argument("--budget", choices=BUDGETS, default="ci")
    s.add_argument("--judge", action="store_true",
                   help="decide each verdict in the trusted judge, as grading does (slower)")
    s.set_defaults(func=cmd_mistakes)

    s = sub.add_parser("demo", help="the main job: execute and grade a sample class of every lesson "
                                    "at ci budget")
    s.add_argument("lessons", nargs="*")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("bench", help="run lessons at full budget and collect what they measured")
    s.add_argument("lessons", nargs="*")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("lab", help="open the student notebooks in JupyterLab")
    s.add_argument("extra", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_lab)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CourseError as e:
        print(f"brewslm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The import graph between a crate's modules, and the cycles in it.

    scripts/module-cycles.py [--graph] CRATE_SRC_DIR...
    scripts/module-cycles.py --self-test

For each library crate (its `src/` directory, entered at `lib.rs`), every
`crate::...` and `super::...` path in the sources (test modules left out, as
`cargo modules` leaves them out by default) becomes an edge between modules at
two levels:

- between the crate's top-level modules (`crate::store` and everything under
  it is one node), and
- between sibling submodules of one top-level module (`store::kube_store` and
  `store::kube_nodes`), a parent and its own children excepted: a parent
  declares its children and a child may use its parent's types.

It prints every cycle and exits 1 if there is one (the lint tier runs it), or
prints the graph with --graph. Paths the compiler resolves through `pub use`
re-exports count where they are written, which is what a reader follows.
"""

import os
import re
import sys

# One left-to-right pass, so a "/*" in a string or a quote in a comment is
# taken for what it is: comments, raw strings, strings, chars (not lifetimes).
TOKEN = re.compile(
    r"//[^\n]*"
    r"|/\*.*?\*/"
    r'|\bb?r(#*)".*?"\1'
    r'|b?"(?:\\.|[^"\\])*"'
    r"|b?'(?:\\u\{[0-9a-fA-F]+\}|\\.|[^\\'\n])'",
    re.S,
)
CFG_TEST = re.compile(r"#\[cfg\(test\)\]")
PATH = re.compile(r"\b(crate|super)((?:::(?:super\b|self\b|\w+|\{))+)")


def strip(text):
    """Comments and literals out; strings kept as "" so no path is found in one."""

    def keep(m):
        return " " if m.group(0).startswith("/") else '""'

    return TOKEN.sub(keep, text)


def skip_item(text, pos):
    """The end of the item starting at pos: its `;` or its balanced block."""
    depth = 0
    while pos < len(text):
        ch = text[pos]
        if ch == ";" and depth == 0:
            return pos + 1
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    return pos


def drop_tests(text):
    out, pos = [], 0
    for m in CFG_TEST.finditer(text):
        if m.start() < pos:
            continue
        out.append(text[pos : m.start()])
        pos = skip_item(text, m.end())
    out.append(text[pos:])
    return "".join(out)


def group_heads(text, start):
    """The first segments of the paths in a `{...}` group opening at start."""
    heads, depth, item, pos = [], 0, "", start
    while pos < len(text):
        ch = text[pos]
        if ch == "{":
            depth += 1
            if depth == 1:
                pos += 1
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                heads.append(item)
                break
        if depth == 1 and ch == ",":
            heads.append(item)
            item = ""
        elif depth >= 1:
            item += ch
        pos += 1
    return [re.split(r"::|\s|\{", h.strip())[0] for h in heads if h.strip()]


def module_of(src, path):
    rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
    if rel[-1] in ("mod", "lib"):
        rel = rel[:-1]
    return rel


def references(mod, text):
    """Module paths (lists of segments) that text, in module mod, names."""
    for m in PATH.finditer(text):
        base = [] if m.group(1) == "crate" else mod[:-1]
        segs = [s for s in m.group(2).split("::") if s]
        path = list(base)
        ok = True
        for i, s in enumerate(segs):
            if s == "super":
                if not path:
                    ok = False
                    break
                path = path[:-1]
            elif s == "self":
                continue
            elif s == "{":
                for head in group_heads(text, m.end() - 1):
                    if head not in ("self", "super", "*", ""):
                        yield path + [head]
                    else:
                        yield path
                ok = False
                break
            else:
                path.append(s)
        if ok and path:
            yield path


def crate_graph(src):
    files = []
    for root, _, names in os.walk(src):
        files += [os.path.join(root, n) for n in names if n.endswith(".rs")]
    mods = {}
    for f in files:
        if os.path.basename(f) == "main.rs" and os.path.dirname(f) == src:
            continue  # the binary: a crate of its own that uses the library
        if os.path.basename(f) in ("tests.rs",):
            continue
        mods[tuple(module_of(src, f))] = drop_tests(strip(open(f).read()))
    known = set(mods)

    def owner(path):
        """The longest known module that is a prefix of path (None for an
        item at the crate root, or a path from an inline module's `super::`
        that left its file: both stay within a module already counted)."""
        for n in range(len(path), 0, -1):
            if tuple(path[:n]) in known:
                return path[:n]
        return None

    top, sub = {}, {}
    for mod, text in mods.items():
        if not mod:
            continue
        for ref in references(list(mod), text):
            target = owner(ref)
            if target is None:
                continue
            if target[0] != mod[0]:
                top.setdefault(mod[0], set()).add(target[0])
            # Siblings under one parent: compare at the depth where they part.
            depth = 0
            while depth < min(len(mod), len(target)) and mod[depth] == target[depth]:
                depth += 1
            if 0 < depth < len(mod) and depth < len(target):
                a = "::".join(mod[: depth + 1])
                b = "::".join(target[: depth + 1])
                sub.setdefault(a, set()).add(b)
    return top, sub


def cycles(graph):
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def self_test():
    """The check finds a cycle, and none where only tests, comments or
    strings name the other module (the lint tier runs this first)."""
    import tempfile

    files = {
        "lib.rs": "mod a;\nmod b;\nmod c;\n",
        "a.rs": 'pub struct A;\nconst S: &str = "/* not a comment";\nuse crate::b::B;\n',
        "b.rs": "pub struct B;\nuse crate::{a::A, c};\n",
        "c.rs": (
            "pub struct C;\n// use crate::a::A;\nconst T: &str = \"crate::a::A\";\n"
            "#[cfg(test)]\nmod tests {\n    use crate::b::B;\n}\n"
        ),
    }
    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        top, _ = crate_graph(d)
        assert top == {"a": {"b"}, "b": {"a", "c"}}, top
        assert cycles(top) == [["a", "b"]], cycles(top)
        del files["a.rs"]
        os.remove(os.path.join(d, "a.rs"))
        with open(os.path.join(d, "lib.rs"), "w") as f:
            f.write("mod b;\nmod c;\n")
        top, _ = crate_graph(d)
        assert cycles(top) == [], top
    print("module-cycles.py: self-test passed")
    return 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    show = "--graph" in argv
    srcs = [a for a in argv if a != "--graph"]
    found = 0
    for src in srcs:
        crate = os.path.basename(os.path.dirname(os.path.abspath(src)))
        top, sub = crate_graph(src)
        for level, graph in (("modules", top), ("submodules", sub)):
            if show:
                print(f"{crate} {level}:")
                for a in sorted(graph):
                    print(f"  {a} -> {', '.join(sorted(graph[a]))}")
            for comp in cycles(graph):
                found += 1
                edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
                print(f"{crate}: a cycle between {level} {', '.join(comp)}: {'; '.join(edges)}")
    if found:
        print(f"{found} module cycle(s): give the shared part a leaf module both can use")
        return 1
    if not show:
        print(f"no module cycles in {', '.join(srcs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

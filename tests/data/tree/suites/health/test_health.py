"""The test tree's health suite: the facts are readable (the real one also runs a minimal VM)."""


def test_facts_readable(facts):
    assert facts["cpu"]["vendor"] in ("intel", "amd")

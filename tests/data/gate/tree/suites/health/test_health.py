"""Health suite of the gate's test tree (the runner health-checks unknown hosts before a run)."""


def test_facts_readable(facts):
    assert facts["cpu"]["vendor"] in ("intel", "amd")

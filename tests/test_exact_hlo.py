"""experiments/exact_hlo.py's reading of compiled HLO for rebuild="pullback": the computation a
rounding depends on, through fusions, as an order-free signature (hand-written HLO, no compile).
"""

from experiments import exact_hlo
from experiments.exact_hlo import parse, rounding_cones

# A loop body computing q = round(gemm(view(a)) * view(b)) and b + q: the views are top-level
# converts, the gemm a custom call with a tuple result, the product a fusion of its own, the
# rounding fused with the int32 combine (a tuple root read through get-tuple-element). Operand
# lists with /*index=N*/ comments, as XLA prints them past the fifth operand.
BODY = """
%scale (p0: f32[4], p1: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  ROOT %m = f32[4]{0} multiply(%p0, %p1)
}

%rounded (p0: f32[4], p1: s32[4]) -> (s32[4], f32[4]) {
  %p1 = s32[4]{0} parameter(1)
  %p0 = f32[4]{0} parameter(0)
  %r = f32[4]{0} round-nearest-even(%p0)
  %q = s32[4]{0} convert(%r)
  %a = s32[4]{0} add(%p1, %q)
  ROOT %t = (s32[4]{0}, f32[4]{0}) tuple(%a, %r)
}

%body (arg: (s32[4], s32[4], s32[4], s32[4], s32[4], s32[4])) -> (s32[4]) {
  %arg = (s32[4]{0}, s32[4]{0}, s32[4]{0}, s32[4]{0}, s32[4]{0}, s32[4]{0}) parameter(0)
  %g = s32[4]{0} get-tuple-element(%arg), index=5
  %h = s32[4]{0} get-tuple-element(%arg), index=4
  %VIEWS
  %cc = (f32[4]{0}, s8[16]{0}) custom-call(%v), custom_call_target="gemm"
  %w = f32[4]{0} get-tuple-element(%cc), index=0
  %f1 = f32[4]{0} fusion(%w, %u), kind=kLoop, calls=%scale
  %f2 = (s32[4]{0}, f32[4]{0}) fusion(%f1, %g), kind=kLoop, calls=%rounded
  %o = s32[4]{0} get-tuple-element(%f2), index=0
  ROOT %out = (s32[4]{0}) tuple(%o)
}

ENTRY %main (x: s32[4]) -> (s32[4]) {
  %x = s32[4]{0} parameter(0)
  %tup = (s32[4]{0}, s32[4]{0}, s32[4]{0}, s32[4]{0}, s32[4]{0}, /*index=5*/s32[4]{0}) \
tuple(%x, %x, %x, %x, %x, /*index=5*/%x)
  ROOT %w = (s32[4]{0}) while(%tup), condition=%cond, body=%body
}
"""
VIEWS = ("%v = f32[4]{0} convert(%g)", "%u = f32[4]{0} convert(%h)")


def module(views=VIEWS, fused: bool = True) -> str:
    text = BODY.replace("%VIEWS", "\n  ".join(views))
    if not fused:  # the product as a top-level instruction
        text = text.replace("fusion(%w, %u), kind=kLoop, calls=%scale", "multiply(%w, %u)")
    return text


def test_rounding_cone_follows_fusions_and_stops_at_integers():
    ((body, cones),) = rounding_cones(module())
    assert body == "body"
    ((signature, listing),) = cones
    # Through the fusion's parameters to the product's fusion, a custom call's tuple element
    # and the views; not the s32 combine, nor the loop's int32 carries.
    assert listing == [
        "convert f32[4]",
        "convert f32[4]",
        'custom-call (f32[4], s8[16]) ["gemm"]',
        "get-tuple-element f32[4]",
        "fusion [kLoop]: multiply f32[4]",
        "fusion [kLoop]: round-nearest-even f32[4]",
    ]
    assert parse(module())["main"][-1].operands == ["tup"]
    assert parse(module())["main"][-2].operands == ["x"] * 6  # /*index=5*/ stripped


def test_rounding_cone_signature_ignores_order_but_not_fusion():
    ((_, ((same, _),)),) = rounding_cones(module())
    # The two independent views in the other order: the same computation.
    ((_, ((reordered, _),)),) = rounding_cones(module(views=VIEWS[::-1]))
    assert reordered == same
    # The same ops, with the product not fused: another program.
    ((_, ((unfused, _),)),) = rounding_cones(module(fused=False))
    assert unfused != same


def test_isolated_report_lists_each_distinct_evaluation_once():
    forward, backward = ["add s32[]", "fusion f32[64] [kLoop: multiply]"], ["add s32[]"]
    found = [("body_a", [forward, forward]), ("body_b", [backward, forward])]
    text = "\n".join(exact_hlo._distinct_details(found))
    assert text.count("<details>") == 2
    assert f"<summary>{exact_hlo.digest(forward)}</summary>" in text
    assert f"<summary>{exact_hlo.digest(backward)}</summary>" in text

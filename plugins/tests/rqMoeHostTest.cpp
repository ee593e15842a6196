/*
 * Host-side checks of the launcher library that need no GPU: attribute and shape validation (partial INT4
 * blocks and the optional INT8 class included), copy tables, workspace layout and alignment, tile choice, and which embedded cubin each
 * compute capability gets. Prints "N passed, M failed".
 */
#include "rqMoeInternal.h"
#include "rqMoeLauncher.h"

#include <cstdio>
#include <string>

namespace
{
int gPassed = 0;
int gFailed = 0;

void check(bool ok, std::string const& what)
{
    ++(ok ? gPassed : gFailed);
    if (!ok)
    {
        std::printf("FAILED: %s\n", what.c_str());
    }
}

rq::MoeAttributes attrs()
{
    rq::MoeAttributes a;
    a.numExperts = 3;
    a.topK = 2;
    a.activation = "silu_glu";
    a.copies = {1, 3, 2};
    a.precision = {0, 0, 1, 1, 0, 1};
    a.groupSize = 128;
    return a;
}

//! The input shapes of attrs() for T tokens, hidden H and intermediate I (docs/spec.md §8): the ten of a node
//! without the INT8 class, or fourteen with it.
struct Shapes
{
    rq::Shape s[rq::kNB_INPUTS_INT8];
    int32_t n{rq::kNB_INPUTS};
};

//! attrs() with its last original copy and its second INT4 copy made INT8: 2 original, 2 INT4, 2 INT8 copies.
rq::MoeAttributes mixedAttrs()
{
    rq::MoeAttributes a = attrs();
    a.precision = {0, 2, 1, 1, 0, 2};
    return a;
}

Shapes shapesFor(int64_t t, int64_t h, int64_t i, int64_t g = 128)
{
    auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
    return Shapes{{{t, h}, {t, 2}, {t, 2}, {3}, {3, 2 * i, h}, {3, h, i}, {3, 2 * i, cdiv(h, 2)},
        {3, 2 * i, cdiv(h, g)}, {3, h, cdiv(i, 2)}, {3, h, cdiv(i, g)}}};
}

//! The fourteen shapes of mixedAttrs() (2 copies of each class).
Shapes mixedShapesFor(int64_t t, int64_t h, int64_t i, int64_t g = 128)
{
    auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
    return Shapes{{{t, h}, {t, 2}, {t, 2}, {3}, {2, 2 * i, h}, {2, h, i}, {2, 2 * i, cdiv(h, 2)},
                      {2, 2 * i, cdiv(h, g)}, {2, h, cdiv(i, 2)}, {2, h, cdiv(i, g)}, {2, 2 * i, h},
                      {2, 2 * i, cdiv(h, g)}, {2, h, i}, {2, h, cdiv(i, g)}},
        rq::kNB_INPUTS_INT8};
}

rq::Status validate(Shapes const& x, rq::MoeDims& d, std::string& msg, rq::MoeAttributes const& a = attrs())
{
    return rq::validateShapes(a, x.s, x.n, d, msg);
}

void attributeChecks()
{
    std::string msg;
    check(rq::validateAttributes(attrs(), msg) == rq::Status::kSUCCESS, "valid attributes accepted");
    auto bad = attrs();
    bad.precision.pop_back();
    check(rq::validateAttributes(bad, msg) == rq::Status::kBAD_ATTRIBUTE && msg.find("expected 6, got 5") != std::string::npos,
        "precision length error names expected and got");
    bad = attrs();
    bad.activation = "swish";
    check(rq::validateAttributes(bad, msg) == rq::Status::kBAD_ATTRIBUTE && msg.find("silu_glu") != std::string::npos,
        "unknown activation rejected, the known ones listed");
    bad = attrs();
    bad.groupSize = 32;
    check(rq::validateAttributes(bad, msg) == rq::Status::kBAD_ATTRIBUTE, "group size 32 rejected");
    bad = attrs();
    bad.copies[1] = 0;
    check(rq::validateAttributes(bad, msg) == rq::Status::kBAD_ATTRIBUTE, "zero copies rejected");
    check(rq::validateAttributes(mixedAttrs(), msg) == rq::Status::kSUCCESS, "INT8 copies (precision 2) accepted: " + msg);
    bad = mixedAttrs();
    bad.precision[1] = 3;
    check(rq::validateAttributes(bad, msg) == rq::Status::kBAD_ATTRIBUTE && msg.find("2 (int8), got 3") != std::string::npos,
        "precision 3 rejected, the three codes named: " + msg);
    bad = mixedAttrs();
    bad.precision = {0, 2, 0, 0, 0, 2};
    bad.groupSize = 32;
    check(rq::validateAttributes(bad, msg) == rq::Status::kBAD_ATTRIBUTE && msg.find("group_size") != std::string::npos,
        "INT8 copies need group size 64 or 128 too: " + msg);

    for (int32_t code = 0; code < rq::numActivations(); ++code)
    {
        std::string const name = rq::activationName(code);
        bool const gated = name.size() > 4 && name.compare(name.size() - 4, 4, "_glu") == 0;
        check(rq::activationCode(name) == code && rq::isGlu(code) == gated, "activation table entry " + name);
    }
    check(rq::activationName(rq::numActivations()) == nullptr && !rq::isGlu(-1), "activation codes out of range");
}

void tableChecks()
{
    rq::CopyTables t = rq::buildCopyTables(attrs());
    check((t.base == std::vector<int32_t>{0, 1, 4}), "phys_base");
    check((t.phy2log == std::vector<int32_t>{0, 1, 1, 1, 2, 2}), "phy2log");
    check((t.slot == std::vector<int32_t>{0, 1, 0, 1, 2, 2}), "slot inside precision class");
    check(t.numOrig == 3 && t.numInt4 == 3 && t.numInt8 == 0, "class sizes");
    rq::CopyTables m = rq::buildCopyTables(mixedAttrs()); // precision {0, 2, 1, 1, 0, 2}
    check((m.slot == std::vector<int32_t>{0, 0, 0, 1, 1, 1}) && m.numOrig == 2 && m.numInt4 == 2 && m.numInt8 == 2,
        "slots and sizes of three precision classes (docs/spec.md §8)");
    check(rq::chooseBlockM(16 * 6, 6) == 16 && rq::chooseBlockM(16 * 6 + 1, 6) == 64, "block_m rule");
}

void shapeChecks()
{
    std::string msg;
    rq::MoeDims d;
    check(validate(shapesFor(5, 256, 128), d, msg) == rq::Status::kSUCCESS && d.hiddenSize == 256 && d.interSize == 128
            && d.numTokens == 5 && d.numPhys == 6,
        "valid shapes accepted, dims read from them: " + msg);
    // LLaMA-MoE v1: I = 688 = 5 full blocks of 128 and a partial one of 48 (docs/spec.md §5).
    check(validate(shapesFor(5, 256, 688), d, msg) == rq::Status::kSUCCESS && d.interSize == 688,
        "partial last INT4 block (I=688, G=128) accepted: " + msg);
    check(validate(shapesFor(-1, 256, 688), d, msg) == rq::Status::kSUCCESS && d.numTokens == -1,
        "dynamic T accepted at build time: " + msg);
    Shapes x = shapesFor(5, 256, 688);
    x.s[rq::kW_OUT_SCALES][2] = 5; // floor(688/128): the partial block is missing
    check(validate(x, d, msg) == rq::Status::kBAD_SHAPE && msg.find("w_out_scales must be [3, 256, 6]") != std::string::npos,
        "scales without the partial block rejected, expected shape named: " + msg);
    x = shapesFor(5, 256, 128);
    x.s[rq::kW_OUT][1] = 512; // H of the weights != hidden
    check(validate(x, d, msg) == rq::Status::kBAD_SHAPE && msg.find("w_out must be [3, 256, 128]") != std::string::npos
            && msg.find("got [3, 512, 128]") != std::string::npos,
        "weights of another H rejected: " + msg);
    x = shapesFor(5, 256, 128);
    x.s[rq::kW_IN_Q][2] = 256; // unpacked width
    check(validate(x, d, msg) == rq::Status::kBAD_SHAPE && msg.find("w_in_q") != std::string::npos,
        "packed width must be ceil(H/2): " + msg);
    x = shapesFor(5, 256, 128);
    x.s[rq::kW_IN][0] = 2;
    check(validate(x, d, msg) == rq::Status::kBAD_SHAPE && msg.find("3 original") != std::string::npos,
        "copies of a class must match the precision attribute: " + msg);
    x = shapesFor(5, 256, 128);
    x.s[rq::kTOPK_IDS] = {4, 2};
    check(validate(x, d, msg) == rq::Status::kBAD_SHAPE && msg.find("topk_ids") != std::string::npos,
        "T of topk_ids must equal T of hidden: " + msg);
    x = shapesFor(5, 256, 128);
    x.s[rq::kOFFSETS] = {4};
    check(validate(x, d, msg) == rq::Status::kBAD_SHAPE, "offsets must be [N]");
    x = shapesFor(5, 256, 128);
    x.s[rq::kHIDDEN] = {5, 256, 1};
    check(validate(x, d, msg) == rq::Status::kBAD_SHAPE && msg.find("rank 2") != std::string::npos, "rank checked");
    check(validate(shapesFor(5, 256, 120), d, msg) == rq::Status::kUNSUPPORTED && msg.find("multiples of 16") != std::string::npos,
        "I not a multiple of 16 is what the cubins cannot do: " + msg);

    rq::MoeAttributes allInt4 = attrs();
    allInt4.precision = {1, 1, 1, 1, 1, 1};
    Shapes y = shapesFor(5, 256, 688);
    for (int32_t i : {rq::kW_IN, rq::kW_OUT})
    {
        y.s[i] = {0, 1376, 256};
    }
    for (int32_t i = rq::kW_IN_Q; i <= rq::kW_OUT_SCALES; ++i)
    {
        y.s[i][0] = 6;
    }
    check(validate(y, d, msg, allInt4) == rq::Status::kSUCCESS && d.interSize == 688,
        "an empty original class (leading dimension 0) and I read from the INT4 rows: " + msg);
}

void int8ShapeChecks()
{
    std::string msg;
    rq::MoeDims d;
    rq::MoeAttributes const mixed = mixedAttrs();
    check(validate(mixedShapesFor(5, 256, 688), d, msg, mixed) == rq::Status::kSUCCESS && d.interSize == 688
            && d.numPhys == 6,
        "14 inputs with 2 original, 2 INT4 and 2 INT8 copies, partial last block: " + msg);
    check(validate(mixedShapesFor(-1, 256, 128), d, msg, mixed) == rq::Status::kSUCCESS && d.numTokens == -1,
        "dynamic T with the INT8 class: " + msg);
    Shapes x = shapesFor(5, 256, 128);
    check(validate(x, d, msg, mixed) == rq::Status::kBAD_SHAPE && msg.find("no INT8 inputs") != std::string::npos,
        "INT8 copies on a node of 10 inputs rejected, the missing inputs named: " + msg);
    x = mixedShapesFor(5, 256, 688);
    x.s[rq::kW_OUT_SCALES8][2] = 5;
    check(validate(x, d, msg, mixed) == rq::Status::kBAD_SHAPE
            && msg.find("w_out_scales8 must be [2, 256, 6]") != std::string::npos && msg.find("2 INT8") != std::string::npos,
        "INT8 scales without the partial block rejected, expected shape named: " + msg);
    x = mixedShapesFor(5, 256, 128);
    x.s[rq::kW_IN_Q8][2] = 128; // packed like INT4: INT8 is one byte per value
    check(validate(x, d, msg, mixed) == rq::Status::kBAD_SHAPE && msg.find("w_in_q8 must be [2, 256, 256]") != std::string::npos,
        "INT8 values are unpacked [P_int8, I_in, H]: " + msg);
    x = mixedShapesFor(5, 256, 128);
    x.s[rq::kW_OUT_Q8][0] = 3;
    check(validate(x, d, msg, mixed) == rq::Status::kBAD_SHAPE && msg.find("w_out_q8") != std::string::npos,
        "INT8 copies must match the precision attribute: " + msg);
    x = mixedShapesFor(5, 256, 128);
    x.n = 12;
    check(validate(x, d, msg, mixed) == rq::Status::kBAD_SHAPE && msg.find("got 12") != std::string::npos,
        "input counts other than 10 and 14 rejected: " + msg);
    // A model with INT8 copies in some layer carries the class on every node: an empty one here.
    x = shapesFor(5, 256, 128);
    x.n = rq::kNB_INPUTS_INT8;
    x.s[rq::kW_IN_Q8] = {0, 256, 256};
    x.s[rq::kW_IN_SCALES8] = {0, 256, 2};
    x.s[rq::kW_OUT_Q8] = {0, 256, 128};
    x.s[rq::kW_OUT_SCALES8] = {0, 256, 1};
    check(validate(x, d, msg) == rq::Status::kSUCCESS, "an empty INT8 class (leading dimension 0) accepted: " + msg);
    x.s[rq::kW_OUT_Q8][0] = 1;
    check(validate(x, d, msg) == rq::Status::kBAD_SHAPE && msg.find("w_out_q8 must be [0, ?, ?]") != std::string::npos,
        "a non-empty INT8 class without INT8 copies rejected: " + msg);
    // Only INT8 copies: I read from the INT8 rows.
    rq::MoeAttributes allInt8 = attrs();
    allInt8.precision = {2, 2, 2, 2, 2, 2};
    Shapes y = mixedShapesFor(5, 256, 688);
    for (int32_t i = rq::kW_IN; i <= rq::kW_OUT_SCALES; ++i)
    {
        y.s[i][0] = 0;
    }
    for (int32_t i = rq::kW_IN_Q8; i <= rq::kW_OUT_SCALES8; ++i)
    {
        y.s[i][0] = 6;
    }
    check(validate(y, d, msg, allInt8) == rq::Status::kSUCCESS && d.interSize == 688,
        "only INT8 copies: I read from the INT8 rows: " + msg);
}

void workspaceChecks()
{
    rq::MoeDims d;
    d.numTokens = 1000;
    d.topK = 2;
    d.hiddenSize = 256;
    d.interSize = 128;
    d.numExperts = 3;
    d.numPhys = 6;
    d.floatType = rq::FloatType::kFLOAT16;
    rq::WorkspaceLayout w = rq::workspaceLayout(d);
    size_t const need = 2000 * (256 + 128) * 2; // expert outputs and intermediate alone
    check(w.total > need && w.total % 256 == 0 && w.expertOut >= w.hiddenAct + 2000 * 128 * 2,
        "workspace layout covers every buffer");
    bool aligned = true;
    for (size_t at : {w.eid, w.lrank, w.hist, w.copyStart, w.tileStart[0], w.tileStart[1], w.tileStart[2],
             w.sortedAssign, w.assignPos, w.phys, w.hiddenAct, w.expertOut})
    {
        aligned = aligned && at % 256 == 0;
    }
    check(aligned && w.tileStart[1] >= w.tileStart[0] + (6 + 1) * 4 && w.tileStart[2] >= w.tileStart[1] + (6 + 1) * 4,
        "every buffer 256-byte aligned, the INT4 and INT8 classes' tile_start each in its own buffer");
    d.numTokens = 0;
    check(rq::workspaceLayout(d).total > 0, "workspace for T=0");

    std::string msg;
    alignas(16) static unsigned char buffer[64];
    rq::MoeTensors t;
    t.hidden = buffer;
    t.offsets = buffer + 16;
    check(rq::checkAlignment(t, buffer + 32, msg) == rq::Status::kSUCCESS, "aligned pointers (and null ones) accepted");
    t.offsets = buffer + 8;
    check(rq::checkAlignment(t, buffer + 32, msg) == rq::Status::kUNSUPPORTED && msg.find("offsets") != std::string::npos,
        "a pointer off 16-byte alignment is named: " + msg);
    t.offsets = buffer + 16;
    t.wOutScales8 = buffer + 4;
    check(rq::checkAlignment(t, buffer + 32, msg) == rq::Status::kUNSUPPORTED && msg.find("w_out_scales8") != std::string::npos,
        "the INT8 class's pointers are checked too: " + msg);

    d.numTokens = 4;
    check(rq::validateDims(d, attrs(), msg) == rq::Status::kSUCCESS, "dims accepted");
    d.topK = 3;
    check(rq::validateDims(d, attrs(), msg) == rq::Status::kBAD_SHAPE && msg.find("top_k=2") != std::string::npos,
        "top_k mismatch names expected");
    d.topK = 2;
    d.interSize = 192; // multiple of 16, not of group_size 128: a partial block, fine
    check(rq::validateDims(d, attrs(), msg) == rq::Status::kSUCCESS, "I not a multiple of the group size accepted");
}

//! The cubin choice per GPU, for whatever architectures this build embeds.
void cubinChoiceChecks()
{
    std::vector<int32_t> const archs = rq::embeddedArchs();
    check(rq::embeddedKernelCount() > 0 && !archs.empty(), "cubins embedded");
    auto has = [&](int32_t a) {
        for (int32_t x : archs)
        {
            if (x == a)
            {
                return true;
            }
        }
        return false;
    };
    std::string missing;
    for (int32_t a : archs)
    {
        check(rq::hasAllKernelsForArch(a, missing) && rq::cubinArchFor("combine_f16", a) == a,
            "sm_" + std::to_string(a) + " runs its own cubins; missing: " + missing);
    }
    // 8.x GPUs run the newest sm_8y cubin with y <= their minor.
    for (int32_t device : {80, 86, 87, 89})
    {
        int32_t want = -1;
        for (int32_t a : archs)
        {
            if (a / 10 == 8 && a <= device)
            {
                want = a;
            }
        }
        check(rq::cubinArchFor("expert_in_f16_int4_glu_m16", device) == want,
            "sm_" + std::to_string(device) + " gets the sm_" + std::to_string(want) + " cubin");
    }
    // sm_90a, sm_100a, sm_120a code runs on exactly its own compute capability: 10.3 is not 10.0, 12.1 not 12.0.
    for (int32_t device : {90, 100, 103, 120, 121})
    {
        int32_t const want = has(device) ? device : -1;
        check(rq::cubinArchFor("dispatch_scan", device) == want && rq::hasAllKernelsForArch(device, missing) == has(device),
            "sm_" + std::to_string(device) + (has(device) ? " has its cubins" : " gets no cubin (none runs there)"));
    }
    check(!rq::hasAllKernelsForArch(75, missing) && rq::cubinArchFor("combine_f32", 75) == -1, "no cubins for sm_75");
    // The INT8 class's grouped GEMMs are embedded for every architecture the other variants are.
    bool int8Everywhere = true;
    for (int32_t a : archs)
    {
        for (char const* v : {"expert_in_f16_int8_glu_m16", "expert_in_f32_int8_plain_m64", "expert_out_f16_int8_m64",
                 "expert_out_f32_int8_m16"})
        {
            int8Everywhere = int8Everywhere && rq::cubinArchFor(v, a) == a;
        }
    }
    check(int8Everywhere, "INT8 grouped GEMM cubins for every embedded architecture");
    check(rq::cubinArchFor("no_such_variant", archs.front()) == -1, "unknown variant");
}

//! The choice rule itself, on a table of every kind of cubin (whatever this build embeds).
void cubinRuleChecks()
{
    auto entry = [](int32_t arch, bool specific) {
        return rq::EmbeddedKernel{"v", "e", arch, specific, 4, 0, 1, nullptr, 0};
    };
    rq::EmbeddedKernel const table[] = {entry(80, false), entry(86, false), entry(90, true), entry(100, true),
        entry(120, true)};
    auto pick = [&](int32_t device) {
        rq::EmbeddedKernel const* k = rq::pickKernel(table, 5, "v", device);
        return k != nullptr ? k->arch : -1;
    };
    check(pick(80) == 80 && pick(86) == 86 && pick(87) == 86 && pick(89) == 86,
        "8.x: the newest portable sm_8y cubin not above the device");
    check(pick(90) == 90 && pick(100) == 100 && pick(120) == 120, "sm_90a/100a/120a code on its own compute capability");
    check(pick(103) == -1 && pick(121) == -1 && pick(110) == -1,
        "sm_100a code is not picked for 10.3, nor sm_120a for 12.1: no cubin rather than one that fails to load");
    check(pick(75) == -1 && rq::pickKernel(table, 5, "w", 80) == nullptr, "older GPUs and unknown variants: none");
}

} // namespace

int main()
{
    attributeChecks();
    tableChecks();
    shapeChecks();
    int8ShapeChecks();
    workspaceChecks();
    cubinChoiceChecks();
    cubinRuleChecks();
    std::printf("%d passed, %d failed\n", gPassed, gFailed);
    return gFailed == 0 ? 0 : 1;
}

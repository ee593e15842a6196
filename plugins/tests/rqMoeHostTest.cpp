/*
 * Host-side checks of the launcher library that need no GPU: attribute validation, copy tables,
 * workspace layout, tile choice and the embedded cubin table. Prints "N passed, M failed".
 */
#include "rqMoeKernel.h"

#include <cstdio>
#include <string>

namespace
{
int gPassed = 0;
int gFailed = 0;

void check(bool ok, char const* what)
{
    ++(ok ? gPassed : gFailed);
    if (!ok)
    {
        std::printf("FAILED: %s\n", what);
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
} // namespace

int main()
{
    std::string msg;
    check(rq::validateAttributes(attrs(), msg) == rq::Status::kSUCCESS, "valid attributes accepted");

    auto bad = attrs();
    bad.precision.pop_back();
    check(rq::validateAttributes(bad, msg) == rq::Status::kBAD_ATTRIBUTE
            && msg.find("expected 6, got 5") != std::string::npos,
        "precision length error names expected and got");
    bad = attrs();
    bad.activation = "swish";
    check(rq::validateAttributes(bad, msg) == rq::Status::kBAD_ATTRIBUTE, "unknown activation rejected");
    bad = attrs();
    bad.groupSize = 32;
    check(rq::validateAttributes(bad, msg) == rq::Status::kBAD_ATTRIBUTE, "group size 32 rejected");
    bad = attrs();
    bad.copies[1] = 0;
    check(rq::validateAttributes(bad, msg) == rq::Status::kBAD_ATTRIBUTE, "zero copies rejected");

    rq::CopyTables t = rq::buildCopyTables(attrs());
    check((t.base == std::vector<int32_t>{0, 1, 4}), "phys_base");
    check((t.phy2log == std::vector<int32_t>{0, 1, 1, 1, 2, 2}), "phy2log");
    check((t.slot == std::vector<int32_t>{0, 1, 0, 1, 2, 2}), "slot inside precision class");
    check(t.numOrig == 3 && t.numInt4 == 3, "class sizes");

    check(rq::activationCode("gelu_tanh") == 4 && rq::isGlu(rq::activationCode("gelu_glu"))
            && !rq::isGlu(rq::activationCode("relu")),
        "activation codes match rq.kernels.reference.ACTIVATIONS");

    check(rq::chooseBlockM(16 * 6, 6) == 16 && rq::chooseBlockM(16 * 6 + 1, 6) == 64, "block_m rule");

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
    check(w.total > need && w.total % 256 == 0 && w.expertOut % 256 == 0 && w.expertOut >= w.hiddenAct + 2000 * 128 * 2,
        "workspace layout covers every buffer, aligned");
    d.numTokens = 0;
    check(rq::workspaceLayout(d).total > 0, "workspace for T=0");

    d.numTokens = 4;
    check(rq::validateDims(d, attrs(), msg) == rq::Status::kSUCCESS, "dims accepted");
    d.topK = 3;
    check(rq::validateDims(d, attrs(), msg) == rq::Status::kBAD_SHAPE && msg.find("top_k=2") != std::string::npos,
        "top_k mismatch names expected");
    d.topK = 2;
    d.interSize = 192; // multiple of 16 but not of group_size 128
    check(rq::validateDims(d, attrs(), msg) == rq::Status::kBAD_SHAPE, "INT4 group size divides I");

    check(rq::embeddedKernelCount() > 0, "cubins embedded");
    std::string missing;
    check(rq::hasAllKernelsForArch(90, missing), ("all variants for sm_90; missing: " + missing).c_str());
    check(rq::hasAllKernelsForArch(80, missing), ("all variants for sm_80; missing: " + missing).c_str());
    check(rq::hasAllKernelsForArch(86, missing), "sm_86 runs the sm_80 cubins");
    check(!rq::hasAllKernelsForArch(75, missing), "no cubins for sm_75");

    std::printf("%d passed, %d failed\n", gPassed, gFailed);
    return gFailed == 0 ? 0 : 1;
}

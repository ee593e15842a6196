/*
 * Host-side logic of the rq::RQMoE launcher (see rqMoeLauncher.h): attribute and shape validation, copy tables,
 * workspace layout, tile choice and the choice of an embedded cubin per GPU. No CUDA call happens here, so
 * all of it is tested on machines without a GPU (tests/rqMoeHostTest.cpp).
 */
#include "rqMoeLauncher.h"
#include "rqMoeInternal.h"

#include "rqMoeKernelTable.h"

#include <algorithm>
#include <cstring>

namespace rq
{
namespace
{

//! "[a, b, c]" with -1 shown as "?" (a dimension not known yet).
std::string shapeString(Shape const& s)
{
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i)
    {
        out += (i ? ", " : "") + (s[i] < 0 ? std::string("?") : std::to_string(s[i]));
    }
    return out + "]";
}

//! Compares `got` with `want` dimension by dimension; -1 on either side matches anything.
bool shapeMatches(Shape const& got, Shape const& want)
{
    if (got.size() != want.size())
    {
        return false;
    }
    for (size_t i = 0; i < got.size(); ++i)
    {
        if (got[i] >= 0 && want[i] >= 0 && got[i] != want[i])
        {
            return false;
        }
    }
    return true;
}

char const* const kInputNames[kNB_INPUTS_INT8] = {"hidden", "topk_ids", "topk_weights", "offsets", "w_in", "w_out",
    "w_in_q", "w_in_scales", "w_out_q", "w_out_scales", "w_in_q8", "w_in_scales8", "w_out_q8", "w_out_scales8"};

} // namespace

char const* toString(Status status) noexcept
{
    switch (status)
    {
    case Status::kSUCCESS: return "success";
    case Status::kBAD_ATTRIBUTE: return "bad attribute";
    case Status::kBAD_SHAPE: return "bad shape";
    case Status::kUNSUPPORTED: return "unsupported";
    case Status::kNO_DRIVER: return "CUDA driver not found";
    case Status::kNO_KERNEL_FOR_ARCH: return "no kernel for this GPU";
    case Status::kCUDA_ERROR: return "CUDA error";
    }
    return "unknown status";
}

int32_t numActivations() noexcept
{
    return kNumActivations;
}

char const* activationName(int32_t code) noexcept
{
    return code >= 0 && code < kNumActivations ? kActivationNames[code] : nullptr;
}

int32_t activationCode(std::string const& name) noexcept
{
    for (int32_t i = 0; i < kNumActivations; ++i)
    {
        if (name == kActivationNames[i])
        {
            return i;
        }
    }
    return -1;
}

bool isGlu(int32_t code) noexcept
{
    return code >= 0 && code < kNumActivations && kActivationIsGlu[code];
}

Status validateAttributes(MoeAttributes const& a, std::string& message) noexcept
{
    try
    {
        if (a.numExperts < 1)
        {
            message = concat("num_experts must be >= 1, got ", a.numExperts);
            return Status::kBAD_ATTRIBUTE;
        }
        if (a.topK < 1)
        {
            message = concat("top_k must be >= 1, got ", a.topK);
            return Status::kBAD_ATTRIBUTE;
        }
        if (activationCode(a.activation) < 0)
        {
            std::string known;
            for (int32_t i = 0; i < kNumActivations; ++i)
            {
                known += (i ? ", " : "") + std::string(kActivationNames[i]);
            }
            message = concat("unknown activation '", a.activation, "': expected one of ", known);
            return Status::kBAD_ATTRIBUTE;
        }
        if (static_cast<int32_t>(a.copies.size()) != a.numExperts)
        {
            message = concat("copies must have num_experts=", a.numExperts, " entries, got ", a.copies.size());
            return Status::kBAD_ATTRIBUTE;
        }
        int64_t numPhys = 0;
        for (int32_t c : a.copies)
        {
            if (c < 1)
            {
                message = concat("copies entries must be >= 1, got ", c);
                return Status::kBAD_ATTRIBUTE;
            }
            numPhys += c;
        }
        if (static_cast<int64_t>(a.precision.size()) != numPhys)
        {
            message = concat("precision must have one entry per physical copy: expected ", numPhys, ", got ",
                a.precision.size());
            return Status::kBAD_ATTRIBUTE;
        }
        bool anyQuantized = false;
        for (int32_t p : a.precision)
        {
            if (p != 0 && p != 1 && p != 2)
            {
                message = concat("precision entries must be 0 (original), 1 (int4) or 2 (int8), got ", p);
                return Status::kBAD_ATTRIBUTE;
            }
            anyQuantized = anyQuantized || p != 0;
        }
        if (anyQuantized && a.groupSize != 64 && a.groupSize != 128)
        {
            message = concat("group_size must be 64 or 128 (the INT4/INT8 block sizes), got ", a.groupSize);
            return Status::kBAD_ATTRIBUTE;
        }
        return Status::kSUCCESS;
    }
    catch (...)
    {
        message = "out of memory while validating attributes";
        return Status::kBAD_ATTRIBUTE;
    }
}

CopyTables buildCopyTables(MoeAttributes const& a)
{
    CopyTables t;
    t.logcnt = a.copies;
    t.precision = a.precision;
    int32_t base = 0;
    for (int32_t e = 0; e < a.numExperts; ++e)
    {
        t.base.push_back(base);
        for (int32_t c = 0; c < a.copies[e]; ++c)
        {
            t.phy2log.push_back(e);
        }
        base += a.copies[e];
    }
    for (int32_t p : a.precision)
    {
        t.slot.push_back(p == 1 ? t.numInt4++ : p == 2 ? t.numInt8++ : t.numOrig++);
    }
    return t;
}

Status validateShapes(
    MoeAttributes const& a, Shape const* in, int32_t nbInputs, MoeDims& dims, std::string& message) noexcept
{
    try
    {
        int32_t const numInt8 = static_cast<int32_t>(std::count(a.precision.begin(), a.precision.end(), 2));
        if (!validInputCount(nbInputs))
        {
            message = concat("expected ", kNB_INPUTS, " inputs, or ", kNB_INPUTS_INT8,
                " with the INT8 class (docs/spec.md §8), got ", nbInputs);
            return Status::kBAD_SHAPE;
        }
        if (numInt8 > 0 && nbInputs != kNB_INPUTS_INT8)
        {
            message = concat("precision has ", numInt8, " INT8 copies (code 2) but the node has no INT8 inputs ",
                "(w_in_q8, w_in_scales8, w_out_q8, w_out_scales8): export the model again");
            return Status::kBAD_SHAPE;
        }
        int32_t const ranks[kNB_INPUTS_INT8] = {2, 2, 2, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3};
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            if (static_cast<int32_t>(in[i].size()) != ranks[i])
            {
                message = concat(kInputNames[i], " must have rank ", ranks[i], ", got ", shapeString(in[i]));
                return Status::kBAD_SHAPE;
            }
        }
        int64_t const numTokens = in[kHIDDEN][0];
        int64_t const hidden = in[kHIDDEN][1];
        int32_t const numInt4 = static_cast<int32_t>(std::count(a.precision.begin(), a.precision.end(), 1));
        int32_t const numOrig = static_cast<int32_t>(a.precision.size()) - numInt4 - numInt8;
        bool const glu = isGlu(activationCode(a.activation));
        // I_in from the rows of the gate/up weights of a non-empty class.
        int64_t const inRows = numOrig > 0 ? in[kW_IN][1] : numInt4 > 0 ? in[kW_IN_Q][1] : in[kW_IN_Q8][1];
        if (hidden < 0 || inRows < 0)
        {
            message = concat("hidden size and expert weight rows must be static, got hidden ", shapeString(in[kHIDDEN]));
            return Status::kBAD_SHAPE;
        }
        if (glu && inRows % 2 != 0)
        {
            message = concat("a gated activation (", a.activation, ") needs an even number of w_in rows [2I], got ",
                inRows);
            return Status::kBAD_SHAPE;
        }
        int64_t const inter = glu ? inRows / 2 : inRows;
        auto cdivG = [&](int64_t n) { return (n + a.groupSize - 1) / a.groupSize; };
        Shape const want[kNB_INPUTS_INT8] = {
            {numTokens, hidden},
            {numTokens, a.topK},
            {numTokens, a.topK},
            {a.numExperts},
            {numOrig, inRows, hidden},
            {numOrig, hidden, inter},
            {numInt4, inRows, (hidden + 1) / 2},
            {numInt4, inRows, cdivG(hidden)},
            {numInt4, hidden, (inter + 1) / 2},
            {numInt4, hidden, cdivG(inter)},
            {numInt8, inRows, hidden},
            {numInt8, inRows, cdivG(hidden)},
            {numInt8, hidden, inter},
            {numInt8, hidden, cdivG(inter)},
        };
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            bool const emptyClass = (i == kW_IN || i == kW_OUT) ? numOrig == 0
                : i >= kW_IN_Q8                                 ? numInt8 == 0
                                                                : (i >= kW_IN_Q && numInt4 == 0);
            bool const ok = emptyClass ? (in[i][0] < 0 || in[i][0] == 0) : shapeMatches(in[i], want[i]);
            if (!ok)
            {
                Shape shown = want[i];
                if (emptyClass)
                {
                    shown = {0, -1, -1};
                }
                message = concat(kInputNames[i], " must be ", shapeString(shown), " (N=", a.numExperts, ", K=", a.topK,
                    ", H=", hidden, ", I=", inter, ", ", numOrig, " original, ", numInt4, " INT4 and ", numInt8,
                    " INT8 copies, G=", a.groupSize, "), got ", shapeString(in[i]));
                return Status::kBAD_SHAPE;
            }
        }
        dims.numTokens = numTokens;
        dims.topK = a.topK;
        dims.hiddenSize = static_cast<int32_t>(hidden);
        dims.interSize = static_cast<int32_t>(inter);
        dims.numExperts = a.numExperts;
        dims.numPhys = static_cast<int32_t>(a.precision.size());
        return validateDims(dims, a, message);
    }
    catch (...)
    {
        message = "out of memory while validating shapes";
        return Status::kBAD_SHAPE;
    }
}

Status validateDims(MoeDims const& d, MoeAttributes const& a, std::string& message) noexcept
{
    try
    {
        if (d.topK != a.topK)
        {
            message = concat("topk_ids must be [T, top_k=", a.topK, "], got [T, ", d.topK, "]");
            return Status::kBAD_SHAPE;
        }
        if (d.numExperts != a.numExperts)
        {
            message = concat("offsets must be [num_experts=", a.numExperts, "], got [", d.numExperts, "]");
            return Status::kBAD_SHAPE;
        }
        if (d.numPhys != static_cast<int32_t>(a.precision.size()))
        {
            message = concat("the call has ", d.numPhys, " physical copies, the precision attribute ", a.precision.size());
            return Status::kBAD_SHAPE;
        }
        // The cubins are compiled with H and I divisible by 16 (vectorized loads); scale blocks may be partial.
        if (d.hiddenSize % 16 != 0 || d.interSize % 16 != 0 || d.hiddenSize <= 0 || d.interSize <= 0)
        {
            message = concat("the compiled kernels need H and I to be positive multiples of 16, got H=", d.hiddenSize,
                " I=", d.interSize, " (rq.kernels.rq_moe runs other sizes)");
            return Status::kUNSUPPORTED;
        }
        if (d.numTokens * d.topK > int64_t{1} << 30)
        {
            message = concat("T*K=", d.numTokens * d.topK, " exceeds the int32 indexing of the kernels");
            return Status::kUNSUPPORTED;
        }
        return Status::kSUCCESS;
    }
    catch (...)
    {
        message = "out of memory while validating shapes";
        return Status::kBAD_SHAPE;
    }
}

int32_t chooseBlockM(int64_t numAssign, int32_t numPhys) noexcept
{
    return numAssign <= int64_t{kGemmBlockMSmall} * std::max(numPhys, 1) ? kGemmBlockMSmall : kGemmBlockMLarge;
}

WorkspaceLayout workspaceLayout(MoeDims const& d) noexcept
{
    int64_t const numAssign = std::max<int64_t>(d.numTokens, 0) * d.topK;
    int64_t const numBlocks = cdiv(std::max<int64_t>(numAssign, 1), kDispatchBlockA);
    size_t const actBytes = d.floatType == FloatType::kFLOAT16 ? 2 : 4;
    WorkspaceLayout w;
    BufferPlan plan;
    w.eid = plan.take(numAssign * 4);
    w.lrank = plan.take(numAssign * 4);
    w.hist = plan.take(numBlocks * d.numExperts * 4);
    w.copyStart = plan.take((d.numPhys + 1) * 4);
    w.tileStart[0] = plan.take((d.numPhys + 1) * 4);
    w.tileStart[1] = plan.take((d.numPhys + 1) * 4);
    w.tileStart[2] = plan.take((d.numPhys + 1) * 4);
    w.sortedAssign = plan.take(numAssign * 4);
    w.assignPos = plan.take(numAssign * 4);
    w.phys = plan.take(numAssign * 4);
    w.hiddenAct = plan.take(numAssign * static_cast<size_t>(d.interSize) * actBytes);
    w.expertOut = plan.take(numAssign * static_cast<size_t>(d.hiddenSize) * actBytes);
    w.total = plan.total();
    return w;
}

Status checkAlignment(MoeTensors const& t, void const* workspace, std::string& message) noexcept
{
    try
    {
        struct Named
        {
            char const* name;
            void const* ptr;
        };
        Named const all[] = {{"hidden", t.hidden}, {"topk_ids", t.topkIds}, {"topk_weights", t.topkWeights},
            {"offsets", t.offsets}, {"w_in", t.wIn}, {"w_out", t.wOut}, {"w_in_q", t.wInQ},
            {"w_in_scales", t.wInScales}, {"w_out_q", t.wOutQ}, {"w_out_scales", t.wOutScales},
            {"w_in_q8", t.wInQ8}, {"w_in_scales8", t.wInScales8}, {"w_out_q8", t.wOutQ8},
            {"w_out_scales8", t.wOutScales8}, {"y", t.y},
            {"expert_counts", t.expertCounts}, {"workspace", workspace}};
        for (Named const& n : all)
        {
            if (reinterpret_cast<uintptr_t>(n.ptr) % 16 != 0) // null (an empty tensor) is aligned
            {
                message = concat(n.name, " at ", n.ptr, " is not 16-byte aligned (the compiled kernels assume it)");
                return Status::kUNSUPPORTED;
            }
        }
        return Status::kSUCCESS;
    }
    catch (...)
    {
        message = "out of memory while checking alignment";
        return Status::kUNSUPPORTED;
    }
}

int32_t embeddedKernelCount() noexcept
{
    return kNumEmbeddedKernels;
}

std::vector<int32_t> embeddedArchs()
{
    return std::vector<int32_t>(kEmbeddedArchs, kEmbeddedArchs + kNumEmbeddedArchs);
}

EmbeddedKernel const* pickKernel(EmbeddedKernel const* table, int32_t size, char const* variant, int32_t arch) noexcept
{
    EmbeddedKernel const* best = nullptr;
    for (int32_t i = 0; i < size; ++i)
    {
        EmbeddedKernel const& k = table[i];
        if (std::strcmp(k.name, variant) != 0)
        {
            continue;
        }
        // sm_XYa code runs on exactly X.Y; sm_XY code on X.Y and later minors of major X.
        bool const runs = k.archSpecific ? k.arch == arch : (k.arch / 10 == arch / 10 && k.arch <= arch);
        if (runs && (best == nullptr || k.arch > best->arch))
        {
            best = &k;
        }
    }
    return best;
}

EmbeddedKernel const* findKernel(char const* variant, int32_t arch) noexcept
{
    return pickKernel(kEmbeddedKernels, kNumEmbeddedKernels, variant, arch);
}

int32_t cubinArchFor(char const* variant, int32_t arch) noexcept
{
    EmbeddedKernel const* k = findKernel(variant, arch);
    return k != nullptr ? k->arch : -1;
}

std::vector<std::string> variantNames()
{
    std::vector<std::string> names{"dispatch_count_i32", "dispatch_count_i64", "dispatch_scan", "dispatch_scatter"};
    for (int32_t bm : {kGemmBlockMSmall, kGemmBlockMLarge})
    {
        names.push_back(concat("dispatch_copies_m", bm));
    }
    for (char const* dt : {"f16", "f32"})
    {
        for (char const* cls : {"orig", "int4", "int8"})
        {
            for (int32_t bm : {kGemmBlockMSmall, kGemmBlockMLarge})
            {
                names.push_back(concat("expert_in_", dt, "_", cls, "_glu_m", bm));
                names.push_back(concat("expert_in_", dt, "_", cls, "_plain_m", bm));
                names.push_back(concat("expert_out_", dt, "_", cls, "_m", bm));
            }
        }
        names.push_back(concat("combine_", dt));
    }
    return names;
}

bool hasAllKernelsForArch(int32_t arch, std::string& missing) noexcept
{
    try
    {
        missing.clear();
        for (auto const& n : variantNames())
        {
            if (findKernel(n.c_str(), arch) == nullptr)
            {
                missing += (missing.empty() ? "" : ", ") + n;
            }
        }
        return missing.empty();
    }
    catch (...)
    {
        return false;
    }
}

} // namespace rq

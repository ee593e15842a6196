/*
 * rq::RQMoE launcher: host-side logic and the launch of the AOT-compiled Triton cubins.
 *
 * No TensorRT type appears here, so this library builds and is tested with the CUDA toolkit alone
 * (rqMoeHost.cpp: validation, tables, workspace, cubin choice; rqMoeLauncher.cpp: the driver calls).
 * Every entry point returns a Status (never throws across this header); `message` says what failed,
 * naming the expected and received sizes.
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

typedef struct CUstream_st* cudaStream_t; // same handle as CUstream (cuda_runtime_api.h / cuda.h)

namespace rq
{

enum class Status : int32_t
{
    kSUCCESS = 0,
    kBAD_ATTRIBUTE = 1,      // plugin fields / ONNX attributes are inconsistent
    kBAD_SHAPE = 2,          // tensor shapes do not match docs/spec.md §8
    kUNSUPPORTED = 3,        // a dtype, size or alignment the compiled kernels do not cover
    kNO_DRIVER = 4,          // libcuda.so.1 could not be loaded
    kNO_KERNEL_FOR_ARCH = 5, // no embedded cubin for this GPU
    kCUDA_ERROR = 6,         // a driver call failed
};

char const* toString(Status status) noexcept;

//! Number of activations and the name of code `code` (rq.core.experts.ACTIVATIONS, generated into rqMoeCubins.h).
int32_t numActivations() noexcept;
char const* activationName(int32_t code) noexcept;
//! -1 when `name` is not one of docs/spec.md §8's activations.
int32_t activationCode(std::string const& name) noexcept;
//! Gated activations read w_in as [2I, H] (gate rows, then up rows).
bool isGlu(int32_t code) noexcept;

//! The op attributes (docs/spec.md §8), as the plugin creator receives them.
struct MoeAttributes
{
    int32_t numExperts{0};
    int32_t topK{0};
    std::string activation;
    std::vector<int32_t> copies;    // [N] C_e >= 1
    std::vector<int32_t> precision; // [P] 0 original, 1 INT4, 2 INT8
    int32_t groupSize{128};
};

//! Checks sizes and ranges of the attributes once (plugin constructor).
Status validateAttributes(MoeAttributes const& attrs, std::string& message) noexcept;

//! int32 copy tables in the layout the dispatch kernels read (rq.core.op.copy_tables).
struct CopyTables
{
    std::vector<int32_t> logcnt;    // [N]
    std::vector<int32_t> base;      // [N] first physical id of each expert
    std::vector<int32_t> phy2log;   // [P]
    std::vector<int32_t> precision; // [P]
    std::vector<int32_t> slot;      // [P] index inside the precision class
    int32_t numOrig{0};
    int32_t numInt4{0};
    int32_t numInt8{0};
};

CopyTables buildCopyTables(MoeAttributes const& attrs);

enum class FloatType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
};

//! Sizes of one call. hiddenSize and interSize must be multiples of 16 (the cubins assume it); INT4 and INT8
//! rows of any such width work, the last scale block may be partial (docs/spec.md §5, §5a).
struct MoeDims
{
    int64_t numTokens{0};
    int32_t topK{0};
    int32_t hiddenSize{0};
    int32_t interSize{0};
    int32_t numExperts{0};
    int32_t numPhys{0};
    FloatType floatType{FloatType::kFLOAT16};
    bool ids64{false};
};

//! Input positions (docs/spec.md §8). The INT8 class (10-13) is present on the nodes of a model with INT8
//! copies anywhere and absent otherwise: a node has kNB_INPUTS or kNB_INPUTS_INT8 inputs.
enum Input : int32_t
{
    kHIDDEN = 0,
    kTOPK_IDS = 1,
    kTOPK_WEIGHTS = 2,
    kOFFSETS = 3,
    kW_IN = 4,
    kW_OUT = 5,
    kW_IN_Q = 6,
    kW_IN_SCALES = 7,
    kW_OUT_Q = 8,
    kW_OUT_SCALES = 9,
    kNB_INPUTS = 10,
    kW_IN_Q8 = 10,
    kW_IN_SCALES8 = 11,
    kW_OUT_Q8 = 12,
    kW_OUT_SCALES8 = 13,
    kNB_INPUTS_INT8 = 14,
};

//! True when a node with `nbInputs` inputs is a valid rq::RQMoE node (10 inputs, or 14 with the INT8 class).
inline bool validInputCount(int32_t nbInputs) noexcept
{
    return nbInputs == kNB_INPUTS || nbInputs == kNB_INPUTS_INT8;
}

//! Shape of one tensor; -1 marks a dimension not known yet (dynamic, at build time).
using Shape = std::vector<int64_t>;

//! Checks the input shapes (docs/spec.md §8 order; `nbInputs` 10, or 14 with the INT8 class) against each other
//! and the attributes: ranks, T and K, N, every weight tensor's copies, rows and (packed) columns for H and I. A
//! precision 2 needs the INT8 class. Fills `dims` (numTokens -1 when dynamic); floatType and ids64 are left as
//! they are.
Status validateShapes(MoeAttributes const& attrs, Shape const* inputs, int32_t nbInputs, MoeDims& dims,
    std::string& message) noexcept;

//! Checks the sizes of a call against the attributes and the compiled kernels (shape errors say expected vs got).
Status validateDims(MoeDims const& dims, MoeAttributes const& attrs, std::string& message) noexcept;

//! Same rule as rq.kernels.moe.launch_config: 16-row tiles when copies get few rows.
int32_t chooseBlockM(int64_t numAssign, int32_t numPhys) noexcept;

//! Byte offsets of the scratch buffers inside the plugin workspace (each 256-byte aligned).
struct WorkspaceLayout
{
    size_t eid{0}, lrank{0}, hist{0}, copyStart{0}, sortedAssign{0}, assignPos{0}, phys{0};
    size_t tileStart[3]{0, 0, 0}; // per precision class: one buffer each, so all stay aligned
    size_t hiddenAct{0};       // [A, I] intermediate
    size_t expertOut{0};       // [A, H] per-assignment expert output
    size_t total{0};
};

WorkspaceLayout workspaceLayout(MoeDims const& dims) noexcept;

//! Device pointers of one call, in docs/spec.md §8 input order, then the outputs.
struct MoeTensors
{
    void const* hidden{nullptr};      // [T, H]
    void const* topkIds{nullptr};     // [T, K] int32/int64
    void const* topkWeights{nullptr}; // [T, K]
    void const* offsets{nullptr};     // [N] int64, may be null (zeros)
    void const* wIn{nullptr};         // [P_orig, I_in, H]
    void const* wOut{nullptr};        // [P_orig, H, I]
    void const* wInQ{nullptr};        // [P_int4, I_in, ceil(H/2)] packed bytes
    void const* wInScales{nullptr};   // [P_int4, I_in, ceil(H/G)] fp16
    void const* wOutQ{nullptr};       // [P_int4, H, ceil(I/2)] packed bytes
    void const* wOutScales{nullptr};  // [P_int4, H, ceil(I/G)] fp16
    void const* wInQ8{nullptr};       // [P_int8, I_in, H] int8 (null when the node has no INT8 class)
    void const* wInScales8{nullptr};  // [P_int8, I_in, ceil(H/G)] fp16
    void const* wOutQ8{nullptr};      // [P_int8, H, I] int8
    void const* wOutScales8{nullptr}; // [P_int8, H, ceil(I/G)] fp16
    void* y{nullptr};                 // [T, H]
    void* expertCounts{nullptr};      // [N] int64
};

//! Every pointer the kernels read must be 16-byte aligned (the cubins are compiled so); names the first that is not.
Status checkAlignment(MoeTensors const& tensors, void const* workspace, std::string& message) noexcept;

//! Number of embedded cubins, and the compute capabilities they were compiled for (ascending).
int32_t embeddedKernelCount() noexcept;
std::vector<int32_t> embeddedArchs();

//! Compute capability of the cubin of `variant` that runs on `arch` (e.g. 86 -> 86, or 80 when no sm_86 cubin
//! is embedded; sm_90a/sm_100a/sm_103a/sm_120a cubins run on exactly their own), -1 when none does.
int32_t cubinArchFor(char const* variant, int32_t arch) noexcept;
bool hasAllKernelsForArch(int32_t arch, std::string& missing) noexcept;

//! Loads the cubins for the current CUDA context's device and launches the pipeline.
class MoeLauncher
{
public:
    explicit MoeLauncher(MoeAttributes attrs);
    ~MoeLauncher();
    MoeLauncher(MoeLauncher const&) = delete;
    MoeLauncher& operator=(MoeLauncher const&) = delete;

    //! Loads modules and uploads the copy tables (synchronous allocation and copy); needs a current CUDA
    //! context. Call it before any CUDA graph capture (the plugin does in attachToContext). Idempotent.
    Status initialize(std::string& message) noexcept;
    bool initialized() const noexcept;

    //! Enqueues dispatch, expert GEMMs and combine on `stream`: kernel launches and one async memset only, so
    //! it can be captured in a CUDA graph once initialized. `workspace` holds workspaceLayout(dims).total bytes.
    Status enqueue(MoeDims const& dims, MoeTensors const& tensors, void* workspace, cudaStream_t stream,
        std::string& message) noexcept;

private:
    struct Impl;
    MoeAttributes mAttrs;
    CopyTables mTables;
    std::unique_ptr<Impl> mImpl;
};

} // namespace rq

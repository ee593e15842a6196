/*
 * TensorRT IPluginV3 for rq::RQMoE (namespace "rq", name "RQMoE", version "1"); semantics in docs/spec.md §8.
 *
 * Plugin fields equal the ONNX node attributes: num_experts, top_k, group_size (INT32), activation (CHAR),
 * copies and precision (INT32 arrays). Inputs 0..9 (0..13 with the INT8 class) and outputs 0..1 in docs/spec.md §8
 * order. The work is done
 * by rq::MoeLauncher (rqMoeLauncher.h); this file only adapts TensorRT's interfaces to it.
 *
 * Only the interfaces of TensorRT's public headers are used (pure virtual classes): the library links no
 * TensorRT library, so one build serves TensorRT 10.x, 11.x and TensorRT-RTX, which share this plugin ABI.
 */
#pragma once

#include "rqMoeLauncher.h"

#include <NvInferRuntime.h>

#include <memory>
#include <string>
#include <vector>

namespace rq
{

constexpr char const* kPLUGIN_NAME = "RQMoE";
constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kPLUGIN_NAMESPACE = "rq";
constexpr int32_t kNB_OUTPUTS = 2;

class RQMoEPlugin : public nvinfer1::IPluginV3,
                    public nvinfer1::IPluginV3OneCore,
                    public nvinfer1::IPluginV3OneBuild,
                    public nvinfer1::IPluginV3OneRuntime
{
public:
    //! Throws std::invalid_argument when the attributes are inconsistent (caught by the creator).
    explicit RQMoEPlugin(MoeAttributes attrs);
    ~RQMoEPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    //! Sizes of a call from the tensor descriptors (T and H from hidden, I from the rows of w_in, w_in_q or w_in_q8);
    //! onShapeChange has validated them with validateShapes.
    MoeDims dimsOf(nvinfer1::PluginTensorDesc const* in) const noexcept;

    MoeAttributes mAttrs;
    int32_t mNumOrig{0};
    int32_t mNumInt4{0};
    int32_t mNumInt8{0};
    std::unique_ptr<MoeLauncher> mLauncher; // per runtime clone (one per execution context), made in attachToContext
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialCollection{};
};

class RQMoEPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    RQMoEPluginCreator();
    ~RQMoEPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

//! Parses plugin fields into attributes; returns kBAD_ATTRIBUTE with a message on a missing or mistyped field.
Status parseFields(nvinfer1::PluginFieldCollection const& fc, MoeAttributes& attrs, std::string& message) noexcept;

} // namespace rq

// The library's entry points (rqMoePlugin.map exports nothing else): TensorRT's getCreators and setLoggerFinder,
// and two for tools, which load the library without TensorRT:
//! JSON description of the build (tests pin "activations" to rq.core.experts.ACTIVATIONS):
//! {"plugin": "rq::RQMoE", "version": "1", "archs": [80, ...], "kernels": 308, "precisions": [0, 1, 2], "activations": [["silu_glu", true], ...]}
extern "C" __attribute__((visibility("default"))) char const* rqMoePluginInfo() noexcept;
//! 1 when the embedded cubins run on compute capability `arch` (e.g. 86), else 0 (`rq build --target` asks).
extern "C" __attribute__((visibility("default"))) int32_t rqMoeSupportsArch(int32_t arch) noexcept;

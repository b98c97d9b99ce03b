// Modes shared by the model, the config and the trainer. An enum class each, never ints.
#pragma once

namespace moe {

enum class Device { kCpu, kCuda, kAuto };
enum class AttentionKind { kMha, kMla };
enum class ScoreFn { kSoftmax, kSigmoid };
enum class LrSchedule { kCosine, kWsd, kConstant };
enum class PipeSchedule { k1F1B, kZB1P, kDualPipe, kDualPipeV };
enum class PrecisionMode { kFp32, kBf16, kFp8 };
enum class StateDtype { kFp32, kBf16 };

}  // namespace moe

// The model's dimensions as the config resolves them.
#pragma once

#include "io/config.h"
#include "model/model.h"

namespace moe {

ModelDims config_model_dims(const Config& cfg);

}  // namespace moe

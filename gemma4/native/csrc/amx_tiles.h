// What both AMX tile products share (amx_products.cpp: int8 tiles; amx_bf16_products.cpp: bf16 tiles): the
// permission Linux asks for before a process may use the tile registers, and the tile configuration's layout.
#pragma once
#if defined(GEMMA4_AMX)
#include <cstdint>
#include <sys/syscall.h>
#include <unistd.h>

// Linux lets a process use the tile registers once it asks (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
inline bool amx_permitted() {
    static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return ok;
}

// ldtilecfg's operand: palette 1, then each tile's bytes per row and rows.
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};
#endif

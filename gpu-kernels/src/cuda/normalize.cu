// u8 CHW images -> [-1, 1] as torchvision computes it: (x / 255 - 0.5) / 0.5 in f32, with an
// optional per-image horizontal flip. Batches cross PCIe as u8 (4x less than f32).
template <typename T>
__device__ void normalize_u8(const unsigned char* src, const unsigned char* flip, T* dst, long images, long image_len,
                             int width) {
    GRID_STRIDE(i, images * image_len) {
        long image = i / image_len;
        int x = (int)(i % width);
        int sx = (flip != 0 && flip[image]) ? width - 1 - x : x;
        float v = (float)src[i - x + sx];
        put(dst, i, (v / 255.0f - 0.5f) / 0.5f);
    }
}

extern "C" __global__ void normalize_u8_f32(const unsigned char* src, const unsigned char* flip, float* dst, long images,
                                            long image_len, int width) {
    normalize_u8(src, flip, dst, images, image_len, width);
}

extern "C" __global__ void normalize_u8_bf16(const unsigned char* src, const unsigned char* flip, bf16_t* dst,
                                             long images, long image_len, int width) {
    normalize_u8(src, flip, dst, images, image_len, width);
}

//! Gradient checkpointing: the UNet's forward and backward pass keeping only each block's
//! output (what the skip connections need anyway), not the activations inside the blocks.
//!
//! The forward pass runs block by block with the graph dropped at every block boundary; the
//! backward pass then walks the blocks in reverse, recomputes each one from its saved input
//! with the graph on, and backpropagates the gradient of its output through it alone
//! (`sum(output * grad)` has exactly `grad` as its gradient). A block's output that also feeds
//! a skip connection gets both gradients, added before its own block is reached. The time
//! embedding feeds every ResNet: its gradient is summed over them and backpropagated through
//! the time MLP last. Peak memory holds one block's graph at a time instead of the whole
//! UNet's; the price is a second forward pass.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::UNet;
use crate::error::Result;
use crate::nn::{silu, timestep_embedding};

/// One unit of recomputation.
#[derive(Clone, Copy, Debug)]
enum Segment {
    ConvIn,
    /// ResNet `j` of down block `b` (and its attention).
    Down(usize, usize),
    Downsample(usize),
    Mid,
    /// ResNet `j` of up block `b` (and its attention); takes a skip.
    Up(usize, usize),
    Upsample(usize),
    Out,
}

impl UNet {
    fn segments(&self) -> Vec<Segment> {
        let mut out = vec![Segment::ConvIn];
        for (b, block) in self.down.iter().enumerate() {
            out.extend((0..block.resnets.len()).map(|j| Segment::Down(b, j)));
            if block.down.is_some() {
                out.push(Segment::Downsample(b));
            }
        }
        out.push(Segment::Mid);
        for (b, block) in self.up.iter().enumerate() {
            out.extend((0..block.resnets.len()).map(|j| Segment::Up(b, j)));
            if block.up.is_some() {
                out.push(Segment::Upsample(b));
            }
        }
        out.push(Segment::Out);
        out
    }

    fn run(
        &self,
        segment: Segment,
        x: &Tensor,
        skip: Option<&Tensor>,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        Ok(match segment {
            Segment::ConvIn => self.conv_in.forward(x)?,
            Segment::Down(b, j) => {
                let block = &self.down[b];
                let x = block.resnets[j].forward(x, Some(temb))?;
                match block.attentions.get(j) {
                    Some(a) => a.forward(&x, context)?,
                    None => x,
                }
            }
            Segment::Downsample(b) => self.down[b].down.as_ref().expect("a downsampler").forward(x)?,
            Segment::Mid => {
                let x = self.mid_resnet0.forward(x, Some(temb))?;
                let x = self.mid_attention.forward(&x, context)?;
                self.mid_resnet1.forward(&x, Some(temb))?
            }
            Segment::Up(b, j) => {
                let block = &self.up[b];
                let skip = skip.expect("an up ResNet takes a skip");
                let x = block.resnets[j].forward(&Tensor::cat(&[x, skip], 1)?, Some(temb))?;
                match block.attentions.get(j) {
                    Some(a) => a.forward(&x, context)?,
                    None => x,
                }
            }
            Segment::Upsample(b) => self.up[b].up.as_ref().expect("an upsampler").forward(x)?,
            Segment::Out => self.conv_out.forward(&self.norm_out.forward_silu(x)?)?,
        })
    }

    /// The forward and backward pass with gradient checkpointing: `loss_of` turns the UNet's
    /// prediction into the scalar loss, and `on_grads` receives the gradient stores in which
    /// every parameter's gradient appears once (sum them). Returns the loss. The same
    /// gradients as `loss_of(forward(..)).backward()`, up to the order of the time
    /// embedding's sums.
    pub fn forward_backward_checkpointed(
        &self,
        sample: &Tensor,
        timesteps: &[f32],
        context: &Tensor,
        loss_of: &dyn Fn(&Tensor) -> Result<Tensor>,
        on_grads: &mut dyn FnMut(&GradStore) -> Result<()>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let t =
            timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, sample.device())?
                .to_dtype(sample.dtype())?;
        let temb_graph = self.time_linear2.forward(&silu(&self.time_linear1.forward(&t)?)?)?;
        let temb = Var::from_tensor(&temb_graph.detach())?;
        let context = context.to_dtype(sample.dtype())?.detach();
        let segments = self.segments();

        // Forward: each segment's output, graph dropped; `skip_of[i]`: the output an up
        // ResNet `i` takes as its skip.
        let mut outputs: Vec<Tensor> = Vec::with_capacity(segments.len());
        let mut skip_of: Vec<Option<usize>> = vec![None; segments.len()];
        let mut skips: Vec<usize> = Vec::new();
        for (i, &segment) in segments.iter().enumerate() {
            let input = if i == 0 { sample.detach() } else { outputs[i - 1].clone() };
            if let Segment::Up(..) = segment {
                skip_of[i] = Some(skips.pop().expect("one skip per up ResNet"));
            }
            let skip = skip_of[i].map(|s| outputs[s].clone());
            outputs.push(self.run(segment, &input, skip.as_ref(), temb.as_tensor(), &context)?.detach());
            if matches!(segment, Segment::ConvIn | Segment::Down(..) | Segment::Downsample(_)) {
                skips.push(i);
            }
        }

        // The loss and its gradient with respect to the prediction.
        let prediction = Var::from_tensor(outputs.last().expect("segments"))?;
        let loss = loss_of(prediction.as_tensor())?;
        let store = loss.backward()?;
        let mut grads: Vec<Option<Tensor>> = vec![None; segments.len()];
        grads[segments.len() - 1] = store.get(prediction.as_tensor()).cloned();
        let add = |slot: &mut Option<Tensor>, g: Tensor| -> Result<()> {
            *slot = Some(match slot.take() {
                Some(sum) => (sum + g)?,
                None => g,
            });
            Ok(())
        };

        // Backward, segment by segment.
        let mut temb_grad: Option<Tensor> = None;
        for (i, &segment) in segments.iter().enumerate().rev() {
            let Some(grad) = grads[i].take() else { continue };
            let input = Var::from_tensor(&if i == 0 { sample.detach() } else { outputs[i - 1].clone() })?;
            let skip = skip_of[i].map(|s| Var::from_tensor(&outputs[s])).transpose()?;
            let output =
                self.run(segment, input.as_tensor(), skip.as_ref().map(Var::as_tensor), temb.as_tensor(), &context)?;
            let store = (output * grad)?.sum_all()?.backward()?;
            on_grads(&store)?;
            if i > 0 {
                if let Some(g) = store.get(input.as_tensor()) {
                    add(&mut grads[i - 1], g.clone())?;
                }
            }
            if let (Some(s), Some(skip)) = (skip_of[i], &skip) {
                if let Some(g) = store.get(skip.as_tensor()) {
                    add(&mut grads[s], g.clone())?;
                }
            }
            if let Some(g) = store.get(temb.as_tensor()) {
                add(&mut temb_grad, g.clone())?;
            }
        }
        if let Some(g) = temb_grad {
            on_grads(&(temb_graph * g)?.sum_all()?.backward()?)?;
        }
        Ok(loss.detach())
    }
}

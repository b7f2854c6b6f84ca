// What a per-channel coefficient table costs a streaming backward map: the f64 map
// o = (a·dy + b·(x − m)) + k over two 16 MB f32 inputs into a streamed output, with the
// coefficients broadcast (one set: channels-first) or loaded per 8 outputs from a table of
// C channels (channels-last, as the flat loop does), against the same traffic with a bare
// add ("map-floor") and a read of both inputs ("read2"). Best of 20.
// Build and run (outside CI): gcc -O2 -mavx512f -mavx512dq -fopenmp coef_table.c -o coef_table &&
//   for t in 1 2; do for c in 64 1024; do OMP_NUM_THREADS=$t ./coef_table 16 $c; done; done
// Quoted in bench/RESULTS.md (why the channels-last backward map takes rows in blocks).
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <immintrin.h>
#include <omp.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  size_t mb=atoi(argv[1]); size_t n=mb*(1<<20)/4;
  float*x=aligned_alloc(64,n*4),*d=aligned_alloc(64,n*4),*o=aligned_alloc(64,n*4);
  #pragma omp parallel for
  for(size_t i=0;i<n;i++){x[i]=i;d[i]=1;o[i]=0;}
  double t1=1e9,t2=1e9,t3=1e9,t4=1e9; size_t C=atoi(argv[2]); double*T=aligned_alloc(64,4*C*8); for(size_t i=0;i<4*C;i++)T[i]=0.5+i%7; float s=0;
  for(int r=0;r<20;r++){
    double t=now();
    #pragma omp parallel for
    for(size_t i=0;i<n;i+=16) _mm512_stream_ps(o+i,_mm512_add_ps(_mm512_load_ps(x+i),_mm512_load_ps(d+i)));
    t=now()-t; if(t<t1)t1=t;
    // f64 map-like compute
    t=now();
    #pragma omp parallel for
    for(size_t i=0;i<n;i+=8){
      __m512d xv=_mm512_cvtps_pd(_mm256_load_ps(x+i)), dv=_mm512_cvtps_pd(_mm256_load_ps(d+i));
      __m512d a=_mm512_set1_pd(1.1),b=_mm512_set1_pd(0.3),m=_mm512_set1_pd(2.0),k=_mm512_set1_pd(0.5);
      __m512d v=_mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(a,dv),_mm512_mul_pd(b,_mm512_sub_pd(xv,m))),k);
      _mm256_stream_ps(o+i,_mm512_cvtpd_ps(v));
    }
    t=now()-t; if(t<t2)t2=t;
    t=now();
    #pragma omp parallel for
    for(size_t i=0;i<n;i+=8){
      size_t c=i&(C-1);
      __m512d xv=_mm512_cvtps_pd(_mm256_load_ps(x+i)), dv=_mm512_cvtps_pd(_mm256_load_ps(d+i));
      __m512d a=_mm512_load_pd(T+c),b=_mm512_load_pd(T+C+c),m=_mm512_load_pd(T+2*C+c),k=_mm512_load_pd(T+3*C+c);
      __m512d v=_mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(a,dv),_mm512_mul_pd(b,_mm512_sub_pd(xv,m))),k);
      _mm256_stream_ps(o+i,_mm512_cvtpd_ps(v));
    }
    t=now()-t; if(t<t4)t4=t;
    t=now();
    #pragma omp parallel reduction(+:s)
    { __m512 acc=_mm512_setzero_ps();
    #pragma omp for
    for(size_t i=0;i<n;i+=16) acc=_mm512_add_ps(acc,_mm512_add_ps(_mm512_load_ps(x+i),_mm512_load_ps(d+i)));
    s+=_mm512_reduce_add_ps(acc);}
    t=now()-t; if(t<t3)t3=t;
  }
  printf("%zu MB x %d thr: map-floor %.3f ms, f64-map(bcast coefs) %.3f ms, read2 %.3f ms, table(C=%zu) %.3f ms (%g)\n",mb,omp_get_max_threads(),t1*1e3,t2*1e3,t3*1e3,C,t4*1e3,s);
}
